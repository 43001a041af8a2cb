"""Write this step's keys and values into the paged cache."""
import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_k_token, stride_k_head, stride_v_token, stride_v_head, stride_cache_slot, stride_cache_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:  # padding token: nothing to store
        return
    heads = tl.arange(0, HEAD_ROWS)[:, None]
    dims = tl.arange(0, HEAD_DIM)[None, :]
    mask = heads < NUM_KV_HEADS
    cache_offsets = slot * stride_cache_slot + heads * stride_cache_head + dims
    k = tl.load(k_ptr + token * stride_k_token + heads * stride_k_head + dims, mask=mask)
    v = tl.load(v_ptr + token * stride_v_token + heads * stride_v_head + dims, mask=mask)
    tl.store(k_cache_ptr + cache_offsets, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + cache_offsets, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """k, v: [N, Hkv, D] (rows may be strided); caches: [num_blocks, block_size, Hkv, D]; slot_mapping: [N]."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert k.stride(2) == v.stride(2) == 1 and k_cache.stride() == v_cache.stride()
    # A slot indexes (block, offset) as one flat row, so a block's rows must be back to back.
    assert k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1) and k_cache.stride(3) == 1
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_ROWS=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
    )
