import torch
from torch import nn

from nanovllm.attention.base import AttentionBackend
from nanovllm.utils.context import get_context


class Attention(nn.Module):
    """Writes this step's K/V into the paged cache and attends over it through the backend.

    The model runner binds `backend`, `k_cache` and `v_cache` ([num_blocks, block_size, Hkv, D])
    before the first step; the model itself never knows which backend or device it runs on.
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads, self.scale = num_heads, head_dim, num_kv_heads, scale
        self.backend: AttentionBackend | None = None
        self.k_cache = self.v_cache = torch.tensor([])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [N, H, D], k and v: [N, Hkv, D] -> [N, H, D]."""
        meta = get_context()
        self.backend.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self.backend.forward(q, self.k_cache, self.v_cache, meta, self.scale)
