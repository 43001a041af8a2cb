"""Tensor-parallel linears. Each parameter carries a `weight_loader(param, loaded, shard_id=None)`
that copies this rank's slice of a checkpoint tensor, so sharding lives next to its layer."""
import torch
from torch import nn

from nanovllm.layers.ops import current_ops
from nanovllm.utils.distributed import current_group


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by tensor_parallel_size={denominator}")
    return numerator // denominator


class LinearBase(nn.Module):
    """y = x W^T (+ b). tp_dim: the weight dimension split across ranks (0 output, 1 input, None)."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int | None):
        super().__init__()
        self.tp = current_group()
        self.ops = current_ops()
        self.tp_dim = tp_dim
        self.weight = nn.Parameter(torch.empty(output_size, input_size))
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size))
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        if self.tp_dim is not None and not (self.tp_dim == 1 and param.dim() == 1):
            size = param.shape[self.tp_dim]
            loaded = loaded.narrow(self.tp_dim, self.tp.rank * size, size)
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, bias=self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, output_size, bias, tp_dim=None)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank returns its slice."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, divide(output_size, current_group().world_size), bias, tp_dim=0)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused into one matmul (gate and up projections)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param, loaded, shard_id=None):
        world = self.tp.world_size
        offset = sum(self.output_sizes[:shard_id]) // world
        size = self.output_sizes[shard_id] // world
        loaded = loaded.narrow(0, self.tp.rank * size, size)
        param.data.narrow(0, offset, size).copy_(loaded)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; each rank holds its share of the heads."""

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = False):
        world = current_group().world_size
        self.head_dim = head_dim
        self.num_heads = divide(total_num_heads, world)
        self.num_kv_heads = divide(total_num_kv_heads, world)
        output_size = (total_num_heads + 2 * total_num_kv_heads) * head_dim
        super().__init__(hidden_size, output_size, bias)

    def weight_loader(self, param, loaded, shard_id=None):
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[shard_id]
        loaded = loaded.narrow(0, self.tp.rank * size, size)
        param.data.narrow(0, offset, size).copy_(loaded)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; the caller sums the partial products with an all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(divide(input_size, current_group().world_size), output_size, bias, tp_dim=1)

    def forward(self, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        """-> this rank's partial sum, which the caller all-reduces (utils/partial_sums.py). gated: x is
        [gate | up] of the MLP, and the input is silu(gate) * up (ops.linear)."""
        y = self.ops.linear(x, self.weight, gated)
        if self.bias is not None and self.tp.rank == 0:  # in the sum once, not once per rank
            y = y + self.bias
        return y
