import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Holds the neox-style rotary table Qwen3 uses; `ops.qk_norm_rotate_store` applies it."""

    def __init__(self, head_dim: int, max_position: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)
        # [max_position, head_dim]: cos then sin of each frequency; kept in float32 for accuracy.
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], -1), persistent=False)
