import torch
from torch import nn

from nanovllm.layers.fusable import current_ops


class SiluAndMul(nn.Module):
    """x: [N, 2 * I] (gate then up) -> [N, I]."""

    def __init__(self):
        super().__init__()
        self.ops = current_ops()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.silu_and_mul(x)
