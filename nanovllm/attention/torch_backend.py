"""The reference backend: paged attention in plain torch ops, on any device.

Readable rather than fast; every other backend is tested against it.
"""
import torch
import torch.nn.functional as F

from nanovllm.attention.base import AttentionBackend
from nanovllm.utils.context import AttentionMetadata


def gather_sequence_kv(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """cache: [num_blocks, block_size, Hkv, D], block_table: [M] -> [context_len, Hkv, D]."""
    block_size = cache.shape[1]
    num_blocks = (context_len + block_size - 1) // block_size
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:context_len]


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        valid = slot_mapping >= 0
        slots = slot_mapping[valid].long()
        k_cache.view(-1, *k_cache.shape[2:])[slots] = k[valid].to(k_cache.dtype)
        v_cache.view(-1, *v_cache.shape[2:])[slots] = v[valid].to(v_cache.dtype)

    def forward(self, q, k_cache, v_cache, meta: AttentionMetadata, scale):
        if meta.is_prefill:
            return self._prefill(q, k_cache, v_cache, meta, scale)
        return self._decode(q, k_cache, v_cache, meta, scale)

    @staticmethod
    def _prefill(q, k_cache, v_cache, meta, scale):
        out = torch.empty_like(q)
        cu_seqlens_q = meta.cu_seqlens_q.tolist()
        for b, context_len in enumerate(meta.context_lens.tolist()):
            start, end = cu_seqlens_q[b], cu_seqlens_q[b + 1]
            q_len = end - start
            k = gather_sequence_kv(k_cache, meta.block_tables[b], context_len)
            v = gather_sequence_kv(v_cache, meta.block_tables[b], context_len)
            # Query i sits at position context_len - q_len + i and sees keys up to that position.
            q_pos = torch.arange(context_len - q_len, context_len, device=q.device)
            k_pos = torch.arange(context_len, device=q.device)
            allowed = k_pos[None, :] <= q_pos[:, None]  # [q_len, context_len]
            o = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype),
                attn_mask=allowed, scale=scale, enable_gqa=True)
            out[start:end] = o.transpose(0, 1)
        return out

    @staticmethod
    def _decode(q, k_cache, v_cache, meta, scale):
        B, H, D = q.shape
        block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
        num_blocks = (meta.max_context_len + block_size - 1) // block_size
        # Padding entries (-1) point at block 0; the length mask below hides whatever they read.
        block_tables = meta.block_tables[:, :num_blocks].clamp(min=0).long()
        k = k_cache[block_tables].view(B, num_blocks * block_size, Hkv, D).float()
        v = v_cache[block_tables].view(B, num_blocks * block_size, Hkv, D).float()
        qg = q.view(B, Hkv, H // Hkv, D).float()
        scores = torch.einsum("bkgd,blkd->bkgl", qg, k) * scale
        beyond = torch.arange(k.shape[1], device=q.device)[None, :] >= meta.context_lens[:, None]
        scores.masked_fill_(beyond[:, None, None, :], float("-inf"))
        # Cache rows past the context are never written; zero them so stale NaNs cannot leak via 0 * NaN.
        v = v.masked_fill(beyond[:, :, None, None], 0.0)
        out = torch.einsum("bkgl,blkd->bkgd", scores.softmax(-1), v)
        return out.reshape(B, H, D).to(q.dtype)
