"""Triton kernels for the paged KV cache: store, decode (flash-decoding) and variable-length prefill."""
from nanovllm.attention.triton_kernels.decode import choose_num_splits, paged_decode_attention
from nanovllm.attention.triton_kernels.prefill import paged_prefill_attention
from nanovllm.attention.triton_kernels.store_kv import store_kvcache

__all__ = ["choose_num_splits", "paged_decode_attention", "paged_prefill_attention", "store_kvcache"]
