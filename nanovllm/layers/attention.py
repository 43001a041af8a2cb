import torch
from torch import nn

from nanovllm.attention.base import AttentionBackend
from nanovllm.utils.context import get_context


class Attention(nn.Module):
    """Writes this step's K/V into the paged cache (store) and attends over it (forward) through the backend.

    The model runner binds `backend`, `k_cache` and `v_cache` ([num_blocks, block_size, Hkv, D])
    before the first step; the model itself never knows which backend or device it runs on.
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads, self.scale = num_heads, head_dim, num_kv_heads, scale
        self.backend: AttentionBackend | None = None
        self.k_cache = self.v_cache = torch.tensor([])

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [N, Hkv, D] -> the cache, at this step's slots. (On CUDA the model writes them in its
        q/k kernel instead: ops.qk_norm_rotate_store.)"""
        self.backend.store_kv(k, v, self.k_cache, self.v_cache, get_context().slot_mapping)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """q: [N, H, D] over the cache, which already holds this step's keys and values -> [N, H, D]."""
        return self.backend.forward(q, self.k_cache, self.v_cache, get_context(), self.scale)
