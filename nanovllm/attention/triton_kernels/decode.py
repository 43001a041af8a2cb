"""Paged decode attention: one query per sequence over its paged KV cache.

A program handles one (sequence, KV head, context split). The G = H / Hkv query heads that share the
KV head are the rows of one tile, padded to 16 rows, so scores and the value product run as tl.dot on
the tensor cores (DESIGN.md: 93% of copy bandwidth, against 18-28% for elementwise products).
Small batches also split the context over programs (flash-decoding) and a second kernel merges the
partial softmaxes.

CUDA-graph safe: the grid depends only on shapes, and each sequence's split ranges are derived on the
device from its context length; splits past a sequence's context exit at once.
"""
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from nanovllm.attention.triton_kernels.common import (LOG2E, check_cache, dot_precision, online_softmax_step,
                                                      paged_kv_offsets)
from nanovllm.utils.pdl import pdl_enabled, release_next, wait_for_previous

MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows


@dataclass(frozen=True)
class DecodeLaunch:
    """How the decode kernel reads: tile_bytes per K (or V) tile, warps and pipeline stages per program."""
    tile_bytes: int
    num_warps: int
    num_stages: int

    def tile_tokens(self, head_dim: int, element_size: int) -> int:
        return max(16, min(128, self.tile_bytes // (head_dim * element_size)))


# The block-table lookup takes a pipeline stage ahead of each K/V load, so Triton keeps
# (num_stages - 1) // 2 K/V tiles in flight. With 4 or more programs per SM (H200, probe_attention.py),
# 3, 5 or 7 stages and 8-32 KB tiles were all within a few percent: concurrent programs on each SM hide
# the latency. With 1-2 programs per SM (unsplit batches such as 33-65 sequences x 4 KV heads at TP=2),
# each program must keep more bytes in flight: 32 KB tiles over 8 warps read 64 x 512 tokens at 74% of
# copy bandwidth instead of 60%, 40 x 512 at 54% instead of 41%, 64 x 1024 at 83% instead of 68%. At
# 2.9 programs per SM (96 x 512) they lost (69% against 74%), and at 3.9 (128 x 512: 78% against 85%).
DEFAULT_LAUNCH = DecodeLaunch(tile_bytes=16384, num_warps=4, num_stages=3)
FEW_PROGRAMS_LAUNCH = DecodeLaunch(tile_bytes=32768, num_warps=8, num_stages=3)
FEW_PROGRAMS_PER_SM = 2  # below this many programs per SM (unsplit), FEW_PROGRAMS_LAUNCH
# Split until the grid holds up to this many programs per SM, one wave: measured at 8 x 4000 tokens,
# 512 programs read at 80% of copy bandwidth and 576 (a second, nearly empty wave) at 65%.
PROGRAMS_PER_SM = 4
MAX_SPLITS = 128


@triton.jit
def _split_range(context_len, split, num_splits, TILE: tl.constexpr):
    # Whole tiles per split, so only a sequence's last tile is partial; both kernels derive the same ranges.
    split_len = tl.cdiv(tl.cdiv(context_len, num_splits), TILE) * TILE
    start = split * split_len
    return start, tl.minimum(start + split_len, context_len)


# Values that change from call to call are not specialized on (== 1, % 16 == 0): each specialization
# would be a fresh compile in the middle of serving.
@triton.jit(do_not_specialize=["num_splits", "stride_table_seq"])
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, partial_out_ptr, partial_lse_ptr, qk_scale, num_splits,
    stride_q_seq, stride_q_head, stride_out_seq, stride_out_head,
    stride_cache_block, stride_cache_token, stride_cache_head, stride_table_seq,
    GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    release_next(PDL)
    wait_for_previous(PDL)
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start, end = _split_range(context_len, split, num_splits, TILE)
    if SPLIT:
        if start >= end:  # past this sequence's context; the merge skips this split
            return

    rows = tl.arange(0, GROUP_ROWS)
    row_mask = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
                mask=row_mask[:, None], other=0.0)  # [GROUP_ROWS, D]

    row_max = tl.full([GROUP_ROWS], float("-inf"), tl.float32)
    row_sum = tl.zeros([GROUP_ROWS], tl.float32)
    acc = tl.zeros([GROUP_ROWS, HEAD_DIM], tl.float32)
    table_ptr = block_tables_ptr + seq * stride_table_seq
    for tile_start in range(start, end, TILE):
        tokens = tile_start + tl.arange(0, TILE)
        token_mask = tokens < end
        offsets = paged_kv_offsets(table_ptr, tokens, token_mask, kv_head, stride_cache_block,
                                   stride_cache_token, stride_cache_head, BLOCK_SIZE, HEAD_DIM)  # [TILE, D]
        k = tl.load(k_cache_ptr + offsets, mask=token_mask[:, None], other=0.0).to(q.dtype)
        v = tl.load(v_cache_ptr + offsets, mask=token_mask[:, None], other=0.0).to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [GROUP_ROWS, TILE]
        scores = tl.where(token_mask[None, :], scores, float("-inf"))
        row_max, row_sum, acc = online_softmax_step(scores, v, row_max, row_sum, acc, DOT_PRECISION)

    if SPLIT:
        part = (seq * tl.num_programs(1) * GROUP + heads) * num_splits + split  # [GROUP_ROWS]
        tl.store(partial_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc / row_sum[:, None],
                 mask=row_mask[:, None])
        tl.store(partial_lse_ptr + part, row_max + tl.log2(row_sum), mask=row_mask)
    else:
        # Graph-padding rows have context_len 0: write zeros rather than 0 / 0.
        out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
        tl.store(out_ptr + seq * stride_out_seq + heads[:, None] * stride_out_head + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    partial_out_ptr, partial_lse_ptr, context_lens_ptr, out_ptr, num_splits, stride_out_seq, stride_out_head,
    HEAD_DIM: tl.constexpr, TILE: tl.constexpr, SPLIT_ROWS: tl.constexpr, PDL: tl.constexpr,
):
    release_next(PDL)
    wait_for_previous(PDL)
    seq, head = tl.program_id(0), tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    splits = tl.arange(0, SPLIT_ROWS)
    start, end = _split_range(context_len, splits, num_splits, TILE)
    valid = (splits < num_splits) & (start < end)
    part = (seq * tl.num_programs(1) + head) * num_splits + splits  # [SPLIT_ROWS]
    dims = tl.arange(0, HEAD_DIM)
    lse = tl.load(partial_lse_ptr + part, mask=valid, other=float("-inf"))
    weights = tl.where(valid, tl.exp2(lse - tl.max(lse, 0)), 0.0)
    parts = tl.load(partial_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=valid[:, None], other=0.0)
    total = tl.sum(weights, 0)
    out = tl.sum(weights[:, None] * parts, 0) / tl.where(total > 0, total, 1.0)  # zeros for context_len 0
    tl.store(out_ptr + seq * stride_out_seq + head * stride_out_head + dims, out.to(out_ptr.dtype.element_ty))


@lru_cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_blocks: int, block_size: int, tile: int,
                      num_sms: int) -> int:
    """Context splits per sequence: none once every SM has a program (measured: splitting 256 programs
    over 132 SMs only added the merge); else as many as fit one wave, never a split shorter than a tile."""
    programs = num_seqs * num_kv_heads
    if programs >= num_sms:
        return 1
    tiles_in_longest = triton.cdiv(max_blocks * block_size, tile)
    return max(1, min(PROGRAMS_PER_SM * num_sms // programs, tiles_in_longest, MAX_SPLITS))


def choose_launch(num_seqs: int, num_kv_heads: int, num_splits: int, num_sms: int) -> DecodeLaunch:
    """FEW_PROGRAMS_LAUNCH for an unsplit grid of under FEW_PROGRAMS_PER_SM programs per SM, else the default."""
    few = num_splits == 1 and num_seqs * num_kv_heads < FEW_PROGRAMS_PER_SM * num_sms
    return FEW_PROGRAMS_LAUNCH if few else DEFAULT_LAUNCH


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           num_splits: int | None = None, out: torch.Tensor | None = None,
                           launch: DecodeLaunch | None = None) -> torch.Tensor:
    """q: [B, H, D]; caches: [num_blocks, block_size, Hkv, D]; block_tables: [B, M] int32;
    context_lens: [B] int32 -> [B, H, D]. num_splits defaults to choose_num_splits for this shape, and
    launch to choose_launch (splits are chosen in the default launch's tiles)."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    check_cache(k_cache, v_cache)
    assert q.stride(2) == 1 and block_tables.stride(1) == 1 and num_heads % num_kv_heads == 0
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, block_tables.shape[1], block_size,
                                       DEFAULT_LAUNCH.tile_tokens(head_dim, k_cache.element_size()),
                                       _num_sms(q.device))
    if launch is None:
        launch = choose_launch(num_seqs, num_kv_heads, num_splits, _num_sms(q.device))
    tile = launch.tile_tokens(head_dim, k_cache.element_size())  # both kernels derive the splits from it
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    split = num_splits > 1
    pdl = pdl_enabled(q.device)
    # Partials are float32: [B, H, splits, D] outputs normalized per split, [B, H, splits] log2-sum-exp.
    partial_out = torch.empty((num_seqs, num_heads, num_splits, head_dim) if split else (1,),
                              dtype=torch.float32, device=q.device)
    partial_lse = torch.empty((num_seqs, num_heads, num_splits) if split else (1,), dtype=torch.float32,
                              device=q.device)
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, partial_out, partial_lse, scale * LOG2E, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_ROWS=max(MIN_DOT_ROWS, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE=tile, SPLIT=split, DOT_PRECISION=dot_precision(q.dtype),
        PDL=pdl, num_warps=launch.num_warps, num_stages=launch.num_stages, launch_pdl=pdl,
    )
    if split:
        _merge_splits_kernel[(num_seqs, num_heads)](
            partial_out, partial_lse, context_lens, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, TILE=tile, SPLIT_ROWS=triton.next_power_of_2(num_splits), PDL=pdl, launch_pdl=pdl,
        )
    return out
