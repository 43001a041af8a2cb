"""Pieces shared by the decode and prefill kernels: the paged K/V gather and the online-softmax step."""
import torch
import triton
import triton.language as tl

# Scores are kept in log2 units so the softmax can use exp2 (one instruction) instead of exp.
LOG2E = 1.4426950408889634


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs keep full precision; Triton would otherwise round them to tf32 inside tl.dot.
    return "ieee" if dtype == torch.float32 else "tf32"


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1, "caches: [blocks, block_size, Hkv, D]"
    block_size = k_cache.shape[1]
    assert block_size & (block_size - 1) == 0, f"block_size must be a power of two, got {block_size}"


@triton.jit
def paged_kv_offsets(table_ptr, tokens, token_mask, kv_head,
                     stride_cache_block, stride_cache_token, stride_cache_head,
                     BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Offsets [T, D] of the K/V rows of `tokens` (positions in a sequence) in the paged cache.

    Each token looks up its own block, so a tile may span several blocks or sit inside one.
    """
    blocks = tl.load(table_ptr + tokens // BLOCK_SIZE, mask=token_mask, other=0).to(tl.int64)
    rows = blocks * stride_cache_block + (tokens % BLOCK_SIZE) * stride_cache_token + kv_head * stride_cache_head
    return rows[:, None] + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def online_softmax_step(scores, v, row_max, row_sum, acc, DOT_PRECISION: tl.constexpr):
    """Fold a tile of log2-scaled scores [R, T] and its values [T, D] into the running softmax state:
    row_max [R], row_sum [R] and the unnormalized output acc [R, D] (float32)."""
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    p = tl.exp2(scores - new_max[:, None])
    rescale = tl.exp2(row_max - new_max)
    acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return new_max, row_sum * rescale + tl.sum(p, 1), acc
