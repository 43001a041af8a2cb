import torch
from torch import nn

from nanovllm.layers.fusable import current_ops


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate the two halves of each head), as Qwen3 uses."""

    def __init__(self, head_dim: int, max_position: int, base: float):
        super().__init__()
        self.ops = current_ops()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)
        # [max_position, head_dim]: cos then sin of each frequency; kept in float32 for accuracy.
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], -1).float(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions: [N]; q: [N, H, D]; k: [N, Hkv, D]."""
        return self.ops.rotate(positions, q, k, self.cos_sin_cache)
