"""Prefill attention over variable-length queries, reading K/V straight from the paged cache.

A program handles BLOCK_M queries of one sequence and one query head, flash-attention style. Query i of
a sequence with q_len queries and context_len cached tokens sits at position context_len - q_len + i,
so prefix-cache hits and chunked prefill are the same causal mask with an offset.
"""
import torch
import triton
import triton.language as tl

from nanovllm.attention.triton_kernels.common import (LOG2E, check_cache, dot_precision, online_softmax_step,
                                                      paged_kv_offsets)


# The block-table width changes every step: not specialized on, or each new width could recompile.
@triton.jit(do_not_specialize=["stride_table_seq"])
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, cu_seqlens_q_ptr, out_ptr, qk_scale,
    stride_q_token, stride_q_head, stride_out_token, stride_out_head,
    stride_cache_block, stride_cache_token, stride_cache_head, stride_table_seq,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # The last query tiles see the most keys: launch them first so they don't trail at the end.
    q_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    seq, head = tl.program_id(1), tl.program_id(2)
    q_begin = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_begin
    if q_tile * BLOCK_M >= q_len:
        return
    context_len = tl.load(context_lens_ptr + seq)
    kv_head = head // GROUP

    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < q_len
    positions = context_len - q_len + rows  # [BLOCK_M] position of each query in its sequence
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_begin + rows)[:, None] * stride_q_token + head * stride_q_head + dims[None, :],
                mask=row_mask[:, None], other=0.0)  # [BLOCK_M, D]

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table_ptr = block_tables_ptr + seq * stride_table_seq
    first_position = context_len - q_len + q_tile * BLOCK_M
    # Key tiles wholly at or before the tile's first query are visible to every row: no causal mask.
    unmasked_end = (first_position + 1) // BLOCK_N * BLOCK_N
    # Keys after the tile's last query are visible to none.
    kv_end = tl.minimum(first_position + BLOCK_M, context_len)
    for tile_start in range(0, unmasked_end, BLOCK_N):
        tokens = tile_start + tl.arange(0, BLOCK_N)
        token_mask = tokens < unmasked_end
        offsets = paged_kv_offsets(table_ptr, tokens, token_mask, kv_head, stride_cache_block,
                                   stride_cache_token, stride_cache_head, BLOCK_SIZE, HEAD_DIM)  # [BLOCK_N, D]
        k = tl.load(k_cache_ptr + offsets, mask=token_mask[:, None], other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + offsets, mask=token_mask[:, None], other=0.0).to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        row_max, row_sum, acc = online_softmax_step(scores, v, row_max, row_sum, acc, DOT_PRECISION)
    for tile_start in range(unmasked_end, kv_end, BLOCK_N):
        tokens = tile_start + tl.arange(0, BLOCK_N)
        token_mask = tokens < kv_end
        offsets = paged_kv_offsets(table_ptr, tokens, token_mask, kv_head, stride_cache_block,
                                   stride_cache_token, stride_cache_head, BLOCK_SIZE, HEAD_DIM)
        k = tl.load(k_cache_ptr + offsets, mask=token_mask[:, None], other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + offsets, mask=token_mask[:, None], other=0.0).to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        # Every row sees key 0, so no row is all -inf; rows past q_len compute junk that is never stored.
        visible = (tokens[None, :] <= positions[:, None]) & token_mask[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        row_max, row_sum, acc = online_softmax_step(scores, v, row_max, row_sum, acc, DOT_PRECISION)

    out = acc / row_sum[:, None]
    tl.store(out_ptr + (q_begin + rows)[:, None] * stride_out_token + head * stride_out_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def _tile_config(head_dim: int, element_size: int) -> dict:
    # Measured best of a small sweep on an H200 (D=128, bf16): 253 TFLOP/s against 220-249 for the others.
    if head_dim * element_size <= 256:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    # Wider rows: smaller tiles keep the Q tile and the K/V stages within shared memory.
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            max_seqlen_q: int, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [N, H, D]; caches: [num_blocks, block_size, Hkv, D]; block_tables: [B, M] int32;
    context_lens: [B] int32; cu_seqlens_q: [B + 1] int32 -> [N, H, D]."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_seqs = context_lens.shape[0]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    check_cache(k_cache, v_cache)
    assert q.stride(2) == 1 and block_tables.stride(1) == 1 and num_heads % num_kv_heads == 0
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    config = _tile_config(head_dim, max(q.element_size(), k_cache.element_size()))
    grid = (triton.cdiv(max_seqlen_q, config["BLOCK_M"]), num_seqs, num_heads)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, out, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        DOT_PRECISION=dot_precision(q.dtype), **config,
    )
    return out
