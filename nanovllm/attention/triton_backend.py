"""The CUDA backend: Triton kernels over the paged KV cache (nanovllm/attention/triton_kernels)."""
import torch

from nanovllm.attention.base import AttentionBackend
from nanovllm.attention.triton_kernels import paged_decode_attention, paged_prefill_attention, store_kvcache
from nanovllm.utils.context import AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        store_kvcache(k, v, k_cache, v_cache, slot_mapping)

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        if meta.is_prefill:
            return paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                           meta.cu_seqlens_q, meta.max_seqlen_q, scale)
        # Decode is captured in CUDA graphs: everything it decides on the host comes from shapes alone.
        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)
