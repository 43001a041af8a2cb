"""Qwen3's per-head RMSNorm of q and k, the neox rotary embedding, and the write of k and v into the
paged KV cache: one Triton kernel on CUDA.

torch.compile splits the norm and rotation into six kernels (a reduction and a rotation for each of q
and k, and two copies), and the cache write is a seventh: about 8 us of a 52 us layer at batch 1 on an
H200. This kernel does one token per program, with the rounding steps of the eager version
(ops.qk_norm_rotate): normalize in float32, round to the model dtype, scale by the weight, rotate in
float32, round again. The cache layout is the attention backends' contract (attention/base.py).
"""
import torch
import triton
import triton.language as tl

from nanovllm.utils.pdl import pdl_enabled, release_next, wait_for_previous


@triton.jit
def _norm_rope_heads(x_ptr, stride_x_head, out_ptr, stride_out_head, weight_ptr, cos, sin, eps,
                     NUM_HEADS: tl.constexpr, HEAD_ROWS: tl.constexpr, HALF: tl.constexpr):
    """Normalize and rotate one token's NUM_HEADS heads (x_ptr, out_ptr: that token's first head)."""
    heads = tl.arange(0, HEAD_ROWS)[:, None]
    dims = tl.arange(0, HALF)[None, :]
    mask = heads < NUM_HEADS
    row = x_ptr + heads * stride_x_head
    x1 = tl.load(row + dims, mask=mask, other=0.0)  # [HEAD_ROWS, HALF]: first halves, then second halves
    x2 = tl.load(row + HALF + dims, mask=mask, other=0.0)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    rstd = tl.rsqrt((tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1)) / (2 * HALF) + eps)[:, None]
    dtype = x1.dtype
    w1 = tl.load(weight_ptr + dims)
    w2 = tl.load(weight_ptr + HALF + dims)
    n1 = ((f1 * rstd).to(dtype) * w1).to(tl.float32)
    n2 = ((f2 * rstd).to(dtype) * w2).to(tl.float32)
    out = out_ptr + heads * stride_out_head
    tl.store(out + dims, (n1 * cos - n2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + HALF + dims, (n2 * cos + n1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_store_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, positions_ptr,
    q_weight_ptr, k_weight_ptr, cos_sin_ptr, eps, stride_q_token, stride_q_head, stride_k_token, stride_k_head,
    stride_v_token, stride_v_head, stride_cache_slot, stride_cache_head,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, Q_ROWS: tl.constexpr, K_ROWS: tl.constexpr,
    HALF: tl.constexpr, PDL: tl.constexpr,
):
    release_next(PDL)
    wait_for_previous(PDL)
    token = tl.program_id(0)
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_sin_ptr + position * 2 * HALF + dims)  # [1, HALF], float32
    sin = tl.load(cos_sin_ptr + position * 2 * HALF + HALF + dims)
    _norm_rope_heads(q_ptr + token * stride_q_token, stride_q_head, q_out_ptr + token * NUM_HEADS * 2 * HALF,
                     2 * HALF, q_weight_ptr, cos, sin, eps, NUM_HEADS, Q_ROWS, HALF)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:  # a padding token (slot -1) has no place in the cache
        _norm_rope_heads(k_ptr + token * stride_k_token, stride_k_head, k_cache_ptr + slot * stride_cache_slot,
                         stride_cache_head, k_weight_ptr, cos, sin, eps, NUM_KV_HEADS, K_ROWS, HALF)
        heads = tl.arange(0, K_ROWS)[:, None]
        all_dims = tl.arange(0, 2 * HALF)[None, :]
        mask = heads < NUM_KV_HEADS
        v = tl.load(v_ptr + token * stride_v_token + heads * stride_v_head + all_dims, mask=mask)
        tl.store(v_cache_ptr + slot * stride_cache_slot + heads * stride_cache_head + all_dims,
                 v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def qk_norm_rope_store(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float, cos_sin_cache: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """positions, slot_mapping: [N]; q: [N, H, D], k and v: [N, Hkv, D] (rows may be strided views of the
    qkv product); weights: [D]; cos_sin_cache: [max_position, D] float32; caches: [blocks, block_size,
    Hkv, D]. Writes normalized, rotated k and v at their slots -> q normalized and rotated, contiguous."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1 and k_cache.stride() == v_cache.stride()
    assert cos_sin_cache.dtype == torch.float32 and cos_sin_cache.is_contiguous()
    # A slot indexes (block, offset) as one flat row, so a block's rows must be back to back.
    assert k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1) and k_cache.stride(3) == 1
    q_out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens:
        pdl = pdl_enabled(q.device)
        _qk_norm_rope_store_kernel[(num_tokens,)](
            q, k, v, q_out, k_cache, v_cache, slot_mapping, positions, q_weight, k_weight, cos_sin_cache, eps,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            k_cache.stride(1), k_cache.stride(2),
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, Q_ROWS=triton.next_power_of_2(num_heads),
            K_ROWS=triton.next_power_of_2(num_kv_heads), HALF=head_dim // 2, PDL=pdl, launch_pdl=pdl,
        )
    return q_out
