"""The Triton backend against the torch reference backend (float32, same upcast inputs), on CUDA.

Cache rows that nothing wrote hold NaN and outputs start as NaN, so a wrongly read or unwritten element
shows up as a non-finite result.
"""
import math
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from nanovllm.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from nanovllm.attention import create_backend  # noqa: E402
from nanovllm.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from nanovllm.attention.triton_kernels import (paged_decode_attention, paged_prefill_attention,  # noqa: E402
                                               store_kvcache)
from nanovllm.utils.context import AttentionMetadata  # noqa: E402

pytestmark = pytest.mark.cuda

DEVICE = torch.device("cuda")
# ||out - ref|| / ||ref||: 16-bit operands land between 1e-3 and 1e-2; float32 stays in float32.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-4}


@dataclass(frozen=True)
class Shape:
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16
    permuted: bool = True  # random block ids rather than 0, 1, 2, ...


# name -> (query lengths, context lengths once this step's tokens are written); one query per sequence
# everywhere is a decode batch.
BATCHES = {
    "decode": ([1] * 8, [100, 37, 512, 64, 300, 1, 250, 777]),
    "decode_mixed_lengths": ([1] * 10, [1, 2, 15, 16, 17, 255, 256, 257, 1000, 3000]),
    "long_decode": ([1], [9000]),
    "prefill": ([128] * 4, [128] * 4),
    "prefill_mixed_lengths": ([1, 7, 64, 129, 300, 515], [1, 7, 64, 129, 300, 515]),
    "prefix_hit": ([5, 100, 1, 64, 200], [133, 612, 70, 320, 200]),
    "chunked_prefill": ([256, 256, 97], [256, 768, 3000]),
    "long_prefill": ([1500], [6000]),
}
VARIANTS = {
    "gqa1": Shape(num_kv_heads=16),
    "gqa4": Shape(num_kv_heads=4),
    "gqa8": Shape(num_kv_heads=2),
    "head_dim64": Shape(head_dim=64),
    "block64": Shape(block_size=64),
    "block256": Shape(block_size=256),
    "fp16": Shape(dtype=torch.float16),
    "fp32": Shape(dtype=torch.float32),
    "contiguous_blocks": Shape(permuted=False),
}
CASES = ([pytest.param(batch, Shape(), id=batch) for batch in BATCHES]
         + [pytest.param(batch, shape, id=f"{batch}-{variant}")
            for variant, shape in VARIANTS.items() for batch in ("decode_mixed_lengths", "prefix_hit")])


@dataclass
class Batch:
    q: torch.Tensor        # [N, H, D]
    k: torch.Tensor        # [N, Hkv, D] this step's keys
    v: torch.Tensor        # [N, Hkv, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D], earlier tokens written, NaN elsewhere
    v_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float


def make_batch(query_lens: list[int], context_lens: list[int], shape: Shape, seed: int,
               num_blocks: int | None = None, max_blocks: int | None = None) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    bs, kv_heads, dim = shape.block_size, shape.num_kv_heads, shape.head_dim
    blocks_per_seq = [math.ceil(c / bs) for c in context_lens]
    num_blocks = num_blocks or sum(blocks_per_seq) + 4  # spare blocks that no sequence owns stay NaN
    max_blocks = max_blocks or max(blocks_per_seq) + 1  # at least one -1 padding column
    block_ids = torch.randperm(num_blocks, generator=gen) if shape.permuted else torch.arange(num_blocks)

    def randn(*size):
        return torch.randn(*size, generator=gen).to(shape.dtype)

    k_cache = torch.full((num_blocks, bs, kv_heads, dim), float("nan"), dtype=shape.dtype)
    v_cache = k_cache.clone()
    block_tables = torch.full((len(context_lens), max_blocks), -1, dtype=torch.int32)
    new_slots = []
    for seq, (q_len, context_len) in enumerate(zip(query_lens, context_lens)):
        table = block_ids[:blocks_per_seq[seq]]
        block_ids = block_ids[blocks_per_seq[seq]:]
        block_tables[seq, :len(table)] = table
        positions = torch.arange(context_len)
        slots = table[positions // bs] * bs + positions % bs
        cached = slots[:context_len - q_len]  # written by earlier steps
        k_cache.view(-1, kv_heads, dim)[cached] = randn(len(cached), kv_heads, dim)
        v_cache.view(-1, kv_heads, dim)[cached] = randn(len(cached), kv_heads, dim)
        new_slots.append(slots[context_len - q_len:])

    num_tokens = sum(query_lens)
    is_prefill = max(query_lens) > 1
    cu_seqlens_q = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    meta = AttentionMetadata(
        is_prefill=is_prefill, slot_mapping=torch.cat(new_slots).to(DEVICE),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=DEVICE),
        block_tables=block_tables.to(DEVICE), cu_seqlens_q=cu_seqlens_q.to(DEVICE) if is_prefill else None,
        max_seqlen_q=max(query_lens), max_context_len=max(context_lens))
    return Batch(randn(num_tokens, shape.num_heads, dim).to(DEVICE), randn(num_tokens, kv_heads, dim).to(DEVICE),
                 randn(num_tokens, kv_heads, dim).to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), meta,
                 scale=dim ** -0.5)


def reference_attention(batch: Batch) -> torch.Tensor:
    """The torch backend in float32; unwritten cache rows become 0 since its decode path reads whole blocks."""
    backend = TorchAttentionBackend()
    k_cache, v_cache = batch.k_cache.float().nan_to_num(0.0), batch.v_cache.float().nan_to_num(0.0)
    backend.store_kv(batch.k.float(), batch.v.float(), k_cache, v_cache, batch.meta.slot_mapping)
    return backend.forward(batch.q.float(), k_cache, v_cache, batch.meta, batch.scale)


def triton_attention(batch: Batch, num_splits: int | None = None) -> torch.Tensor:
    meta = batch.meta
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    store_kvcache(batch.k, batch.v, k_cache, v_cache, meta.slot_mapping)
    out = torch.full_like(batch.q, float("nan"))
    if meta.is_prefill:
        return paged_prefill_attention(batch.q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                       meta.cu_seqlens_q, meta.max_seqlen_q, batch.scale, out=out)
    return paged_decode_attention(batch.q, k_cache, v_cache, meta.block_tables, meta.context_lens, batch.scale,
                                  num_splits=num_splits, out=out)


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype):
    assert torch.isfinite(out).all(), "non-finite output: an unwritten output or a read of an unwritten cache row"
    error = ((out.float() - ref).norm() / ref.norm()).item()
    assert error < TOLERANCE[dtype], f"relative error {error:.2e}"


@pytest.mark.parametrize("batch_name, shape", CASES)
def test_kernels_match_reference(batch_name, shape):
    batch = make_batch(*BATCHES[batch_name], shape, seed=len(batch_name))
    assert_close_to_reference(triton_attention(batch), reference_attention(batch), shape.dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 64])
def test_decode_split_counts_match_reference(num_splits):
    # More splits than a short sequence has tiles leaves some splits empty; the merge must skip them.
    batch = make_batch(*BATCHES["decode_mixed_lengths"], Shape(), seed=num_splits)
    assert_close_to_reference(triton_attention(batch, num_splits), reference_attention(batch), torch.bfloat16)


def backend_named(name: str):
    if name == "flash-attn":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed here")
    return create_backend(name)


@pytest.mark.parametrize("backend_name", ["triton", "flash-attn"])
@pytest.mark.parametrize("batch_name", ["decode", "prefix_hit", "chunked_prefill"])
def test_backend_matches_reference(batch_name, backend_name):
    # flash-attn's paged cache needs 256-token blocks.
    batch = make_batch(*BATCHES[batch_name], Shape(block_size=256), seed=7)
    ref = reference_attention(batch)
    backend = backend_named(backend_name)
    backend.store_kv(batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    out = backend.forward(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    assert_close_to_reference(out, ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_store_kv_writes_exactly_the_slots(dtype):
    gen = torch.Generator().manual_seed(3)
    num_blocks, block_size, kv_heads, dim, num_tokens = 6, 16, 4, 64, 40
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::7] = -1  # padding tokens
    # k and v as strided views of one fused projection, as the model produces them.
    kv = torch.randn(num_tokens, 2 * kv_heads * dim + 8, generator=gen).to(dtype).to(DEVICE)
    k = kv[:, :kv_heads * dim].view(num_tokens, kv_heads, dim)
    v = kv[:, kv_heads * dim:2 * kv_heads * dim].view(num_tokens, kv_heads, dim)
    k_cache = torch.full((num_blocks, block_size, kv_heads, dim), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    TorchAttentionBackend().store_kv(k, v, expected_k, expected_v, slots.to(DEVICE))
    store_kvcache(k, v, k_cache, v_cache, slots.to(DEVICE))
    torch.testing.assert_close(k_cache, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, expected_v, rtol=0, atol=0, equal_nan=True)


def test_decode_under_cuda_graph():
    """Capture one decode step (store + attend), then replay it on new batches written into its inputs."""
    shape, max_batch, max_blocks = Shape(), 4, 64
    num_blocks = max_batch * max_blocks + 8
    backend = TritonAttentionBackend()
    static = make_batch([1] * max_batch, [1] * max_batch, shape, seed=0, num_blocks=num_blocks,
                        max_blocks=max_blocks)
    meta = static.meta

    def step():
        backend.store_kv(static.k, static.v, static.k_cache, static.v_cache, meta.slot_mapping)
        return backend.forward(static.q, static.k_cache, static.v_cache, meta, static.scale)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    gen = torch.Generator().manual_seed(1)
    for trial in range(3):
        # The last row is graph padding: context length 0, slot -1, no blocks.
        context_lens = torch.randint(1, max_blocks * shape.block_size + 1, (max_batch - 1,), generator=gen)
        batch = make_batch([1] * (max_batch - 1), context_lens.tolist(), shape, seed=trial, num_blocks=num_blocks,
                           max_blocks=max_blocks)
        for name in ("q", "k", "v"):
            getattr(static, name)[:-1] = getattr(batch, name)
        static.k_cache.copy_(batch.k_cache)
        static.v_cache.copy_(batch.v_cache)
        meta.context_lens.copy_(torch.cat([batch.meta.context_lens, meta.context_lens.new_zeros(1)]))
        meta.slot_mapping.copy_(torch.cat([batch.meta.slot_mapping, meta.slot_mapping.new_full((1,), -1)]))
        meta.block_tables.fill_(-1)
        meta.block_tables[:-1] = batch.meta.block_tables
        graph.replay()
        assert_close_to_reference(out[:-1], reference_attention(batch), shape.dtype)
        assert (out[-1] == 0).all(), "a padding row (context length 0) should come out as zeros"
