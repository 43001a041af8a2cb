import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """x: [N, 2 * I] (gate then up) -> [N, I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, -1)
        return F.silu(gate) * up
