import torch
from torch import nn

from nanovllm.layers.linear import ColumnParallelLinear
from nanovllm.layers.ops import current_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.ops = current_ops()
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual)."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)

    def then(self, linear: ColumnParallelLinear, x: torch.Tensor, residual: torch.Tensor | None):
        """(linear(norm(x + residual)), x + residual), in one kernel where the device has one
        (ops.norm_linear); without residual, (linear(norm(x)), x). linear is column-parallel: its input
        is whole on every rank and its output needs no collective."""
        return self.ops.norm_linear(x, residual, self.weight, self.eps, linear.weight, linear.bias)
