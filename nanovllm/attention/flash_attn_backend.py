"""flash-attn backend (CUDA, when the `flash_attn` package imports).

Prefill: `flash_attn_varlen_func` reading keys straight from the paged cache through `block_table`,
so prefix hits and chunked prefill need no copies. Decode: `flash_attn_with_kvcache`. Writing the new
K/V into the cache reuses the Triton kernel. flash-attn's paged mode needs blocks of a multiple of 256
tokens; Config only picks this backend then.
"""
import torch
from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

from nanovllm.attention.triton_backend import TritonAttentionBackend
from nanovllm.utils.context import AttentionMetadata


class FlashAttnBackend(TritonAttentionBackend):
    name = "flash-attn"

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        if meta.is_prefill:
            cu_seqlens_k = torch.nn.functional.pad(meta.context_lens.cumsum(0, dtype=torch.int32), (1, 0))
            return flash_attn_varlen_func(q, k_cache, v_cache, meta.cu_seqlens_q, cu_seqlens_k, meta.max_seqlen_q,
                                          meta.max_context_len, softmax_scale=scale, causal=True,
                                          block_table=meta.block_tables)
        out = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.context_lens,
                                      block_table=meta.block_tables, softmax_scale=scale, causal=True)
        return out.squeeze(1)
