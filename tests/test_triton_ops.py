"""The Triton kernels of the model and the sampler (layers/gemv.py, layers/qk_norm_rope.py,
sampling/race_kernel.py) against their torch references (layers/ops.py, the torch attention backend).

On CPU the kernels run in Triton's interpreter, so CI checks their indexing and masking. The interpreter
is chosen when Triton is imported, hence a subprocess; it runs float16, since it emulates bfloat16
casts by truncation where a GPU rounds. On a GPU the kernels run compiled, at the models' shapes.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanovllm.layers import ops

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# One rounding of a result to the dtype, plus float32 sums in another order.
ULP = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float32: 1e-5}


def poison_next_outputs(device: str, *outputs: tuple[tuple[int, ...], torch.dtype]):
    """Fill memory of the kernel outputs' sizes with NaN (or -1 for integers) and free it: CUDA's caching
    allocator (best fit) usually hands such a block to the next allocation of its size, so an output
    element the kernel never writes fails the comparison."""
    blocks = [torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)
              for shape, dtype in outputs]
    del blocks


def check_gemv(rows: int, n: int, k: int, gated: bool, dtype: torch.dtype, device: str):
    from nanovllm.layers.gemv import gemv

    torch.manual_seed(rows * n + k)
    w = torch.randn(n, k, dtype=dtype, device=device)
    x = torch.randn(rows, 2 * k if gated else k, dtype=dtype, device=device)
    poison_next_outputs(device, ((rows, n), dtype))
    y = gemv(x, w, gated)
    assert y.shape == (rows, n) and y.dtype == dtype
    if gated:
        gate, up = x.chunk(2, -1)
        x = (F.silu(gate.float()) * up.float()).to(dtype)
    expected = F.linear(x.float(), w.float())
    bound = ULP[dtype] * (expected.abs() + expected.abs().max() / 8)
    assert ((y.float() - expected).abs() <= bound).all()


def check_norm_gemv(rows: int, n: int, k: int, has_residual: bool, dtype: torch.dtype, device: str):
    """norm_gemv against the eager add & RMSNorm, then a float32 product; the new residual exactly."""
    from nanovllm.layers.gemv import norm_gemv

    torch.manual_seed(rows * n + k)
    x = torch.randn(rows, k, dtype=dtype, device=device)
    residual = torch.randn(rows, k, dtype=dtype, device=device) if has_residual else None
    norm_weight = (torch.rand(k, device=device) + 0.5).to(dtype)
    w = torch.randn(n, k, dtype=dtype, device=device)
    poison_next_outputs(device, ((rows, n), dtype), ((rows, k), dtype))
    y, new_residual = norm_gemv(x, residual, norm_weight, 1e-6, w)
    normed, expected_residual = ops.norm_then_linear(ops.rms_norm, ops.add_rms_norm, lambda a, _, bias: a)(
        x, residual, norm_weight, 1e-6, w)
    assert torch.equal(new_residual, expected_residual)
    expected = F.linear(normed.float(), w.float())
    # Besides the output's rounding, an approximate rsqrt may move a normalized input by one unit.
    bound = 2 * ULP[dtype] * (expected.abs() + expected.abs().max() / 8)
    assert ((y.float() - expected).abs() <= bound).all()


def check_qk_norm_rope_store(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                             device: str):
    """q against the eager norm and rotation; the cache against the eager k and v stored by the torch
    backend, at permuted slots with a padding token (slot -1) that must leave the cache alone."""
    from nanovllm.attention.torch_backend import TorchAttentionBackend
    from nanovllm.layers.qk_norm_rope import qk_norm_rope_store
    from nanovllm.layers.rotary_embedding import RotaryEmbedding

    torch.manual_seed(tokens * heads + head_dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device) * 3
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    # Strided views of the qkv product, as in Qwen3.
    q, k, v = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    q_weight = torch.rand(head_dim, dtype=dtype, device=device) + 0.5
    k_weight = torch.rand(head_dim, dtype=dtype, device=device) + 0.5
    cos_sin = RotaryEmbedding(head_dim, 4096, 1e6).cos_sin_cache.to(device)
    positions = torch.randint(0, 4096, (tokens,), device=device)
    block_size, num_blocks = 16, tokens // 16 + 2
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens]
    slots[tokens // 2] = -1
    caches = [torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2)]
    expected_caches = [cache.clone() for cache in caches]
    poison_next_outputs(device, (q.shape, dtype))
    got_q = qk_norm_rope_store(positions, q, k, v, q_weight, k_weight, 1e-6, cos_sin, *caches, slots)
    want_q, want_k = ops.qk_norm_rotate(positions, q, k, q_weight, k_weight, 1e-6, cos_sin)
    TorchAttentionBackend().store_kv(want_k, v, *expected_caches, slots)
    assert got_q.shape == want_q.shape and got_q.is_contiguous()
    for got, want in ((got_q, want_q), *zip(caches, expected_caches)):
        # The same rounding steps as the reference, but float32 sums in another order and an approximate
        # rsqrt can move a normalized value across a rounding boundary: one unit in the last place of
        # the head's largest value, which the rotation's sums may leave next to a small result.
        bound = ULP[dtype] * (want.float().abs() + want.float().abs().amax(-1, keepdim=True)) + 1e-6
        assert ((got.float() - want.float()).abs() <= bound).all()
    assert torch.equal(caches[1], expected_caches[1])  # v is copied, not computed


def check_race(rows: int, dtype: torch.dtype, device: str):
    """Greedy rows (T = 0) give torch's argmax, the first of equal maxima; sampled rows follow softmax(l / T)."""
    from nanovllm.sampling.race_kernel import BLOCK_V, race

    torch.manual_seed(rows)
    vocab = BLOCK_V + 5  # a partial last block
    greedy = torch.randn(8, vocab, device=device).to(dtype)
    greedy[3, [7, BLOCK_V + 1]] = 100.0  # a tie across blocks: the first wins
    poison_next_outputs(device, ((8,), torch.int64))
    assert race(greedy, torch.zeros(8, device=device)).tolist() == greedy.float().argmax(-1).tolist()
    logits = torch.full((rows, vocab), float("-inf"), device=device)
    logits[:, [0, 1, 2, BLOCK_V + 3]] = torch.tensor([1.0, 0.0, -1.0, 0.5], device=device)
    temperature = torch.full((rows,), 0.7, device=device)
    poison_next_outputs(device, ((rows,), torch.int64))
    counts = torch.bincount(race(logits.to(dtype), temperature), minlength=vocab)[[0, 1, 2, BLOCK_V + 3]]
    expected = (torch.tensor([1.0, 0.0, -1.0, 0.5]) / 0.7).softmax(-1)
    sigma = (expected * (1 - expected) / rows).sqrt()
    assert ((counts.cpu() / rows - expected).abs() <= 4 * sigma).all(), (counts, expected)
    assert counts.sum() == rows
    assert not torch.equal(race(logits, temperature), race(logits, temperature))  # a fresh seed each call


def check_race_slices(dtype: torch.dtype, device: str):
    """The race over slices of the vocabulary (tensor-parallel ranks), the best score kept, draws the very
    token the race over the whole vocabulary draws with the same seed; greedy rows included."""
    from nanovllm.sampling.race_kernel import BLOCK_V, race_slice
    from nanovllm.sampling.shard_draw import best_of_slices

    torch.manual_seed(1)
    rows, vocab = 24, 2 * BLOCK_V + 10
    logits = torch.randn(rows, vocab, device=device).to(dtype)
    temperature = torch.full((rows,), 0.8, device=device)
    temperature[::3] = 0.0
    whole, _ = race_slice(logits, temperature, 1234, 0, vocab)
    bounds = [0, 700, BLOCK_V + 3, vocab]  # slices of unequal widths, one that spans blocks
    pairs = []
    for start, end in zip(bounds, bounds[1:]):
        tokens, scores = race_slice(logits[:, start:end], temperature, 1234, start, vocab)
        assert ((tokens >= start) & (tokens < end)).all()
        pairs.append(torch.stack([scores.float(), tokens.float()], 1))
    assert torch.equal(best_of_slices(torch.stack(pairs, 1)), whole)
    assert not torch.equal(race_slice(logits, temperature, 99, 0, vocab)[0], whole)  # the seed matters


def check_split_decode(dtype: torch.dtype, device: str):
    """Decode attention split over the context, then merged: equal to a softmax over each sequence's gathered
    cache, with a graph-padding row (context 0) of zeros. Contexts span one to many tiles; blocks are permuted."""
    from nanovllm.attention.triton_kernels import paged_decode_attention
    from nanovllm.attention.triton_kernels.decode import DEFAULT_LAUNCH, FEW_PROGRAMS_LAUNCH, DecodeLaunch

    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, block_size = 16, 8, 128, 16
    context_lens = torch.tensor([300, 0, 190, 1], dtype=torch.int32)
    blocks_per_seq = 20
    k_cache = torch.randn(4 * blocks_per_seq, block_size, kv_heads, head_dim, generator=generator).to(dtype)
    v_cache = torch.randn(k_cache.shape, generator=generator).to(dtype)
    q = torch.randn(4, heads, head_dim, generator=generator).to(dtype)
    block_tables = torch.randperm(4 * blocks_per_seq, generator=generator, dtype=torch.int32).view(4, -1)
    expected = torch.zeros(q.shape)
    for seq, length in enumerate(context_lens.tolist()):
        if length:
            slots = (block_tables[seq].long()[:, None] * block_size + torch.arange(block_size)).flatten()[:length]
            k = k_cache.flatten(0, 1)[slots].float().repeat_interleave(heads // kv_heads, 1)  # [T, H, D]
            v = v_cache.flatten(0, 1)[slots].float().repeat_interleave(heads // kv_heads, 1)
            weights = (torch.einsum("hd,thd->ht", q[seq].float(), k) * head_dim ** -0.5).softmax(-1)
            expected[seq] = torch.einsum("ht,thd->hd", weights, v)
    tensors = [t.to(device) for t in (q, k_cache, v_cache, block_tables, context_lens)]
    # Both launches (their tiles differ, so the splits' ranges do too) and an odd pipeline depth.
    for num_splits, launch in ((1, DEFAULT_LAUNCH), (3, DEFAULT_LAUNCH), (8, DEFAULT_LAUNCH),
                               (1, FEW_PROGRAMS_LAUNCH), (3, FEW_PROGRAMS_LAUNCH), (2, DecodeLaunch(8192, 2, 5))):
        poison_next_outputs(device, (tuple(q.shape), dtype))
        out = paged_decode_attention(*tensors, head_dim ** -0.5, num_splits=num_splits, launch=launch)
        torch.testing.assert_close(out.float().cpu(), expected, atol=4 * ULP[dtype], rtol=4 * ULP[dtype])


# Sizes that are not multiples of any block, and one row count per size bucket.
GEMV_CASES = [(rows, n, k, gated) for rows in (1, 3, 8)
              for n, k, gated in ((37, 48, False), (100, 72, True), (9, 1100, False))]
NORM_GEMV_CASES = [(rows, n, k, has_residual) for rows in (1, 2) for n, k in ((37, 48), (100, 1100), (5, 4100))
                   for has_residual in (False, True)]
# Qwen3's GQA (16 / 8 heads of 128), a head count that is not a power of two, head_dim 64.
QK_CASES = [(5, 16, 8, 128), (3, 6, 2, 64), (1, 4, 4, 128)]


def test_decode_launch_keeps_more_in_flight_only_for_few_programs():
    from nanovllm.attention.triton_kernels.decode import DEFAULT_LAUNCH, FEW_PROGRAMS_LAUNCH, choose_launch

    sms = 132  # an H100 / H200
    assert choose_launch(64, 4, 1, sms) is FEW_PROGRAMS_LAUNCH  # 256 programs: Qwen3-8B's 64 rows at TP=2
    assert choose_launch(96, 4, 1, sms) is DEFAULT_LAUNCH  # 384 programs, 2.9 per SM
    assert choose_launch(64, 8, 1, sms) is DEFAULT_LAUNCH  # the same rows at TP=1
    assert choose_launch(16, 4, 8, sms) is DEFAULT_LAUNCH  # split: the splits fill the SMs


def test_interpreted_kernels_match_torch():
    script = ("import torch\nfrom tests.test_triton_ops import *\n"
              f"for case in {GEMV_CASES}: check_gemv(*case, torch.float16, 'cpu')\n"
              f"for case in {NORM_GEMV_CASES}: check_norm_gemv(*case, torch.float16, 'cpu')\n"
              f"for case in {QK_CASES}: check_qk_norm_rope_store(*case, torch.float16, 'cpu')\n"
              "check_race(48, torch.float16, 'cpu')\n"
              "check_race_slices(torch.float16, 'cpu')\n"
              "check_split_decode(torch.float16, 'cpu')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr[-3000:]


def test_cpu_ops_never_take_the_kernels():
    from nanovllm.layers.gemv import MAX_ROWS, gemv_applies

    w = torch.empty(16, 8)
    assert not gemv_applies(torch.empty(1, 8), w)
    if torch.cuda.is_available():
        assert gemv_applies(torch.empty(MAX_ROWS, 8, device="cuda"), w.cuda())
        assert not gemv_applies(torch.empty(MAX_ROWS + 1, 8, device="cuda"), w.cuda())
        assert not gemv_applies(torch.empty(0, 8, device="cuda"), w.cuda())
        assert not gemv_applies(torch.empty(8, 1, device="cuda").t(), w.cuda())  # columns not contiguous


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("n,k,gated", [(4096, 1024, False), (1024, 3072, True), (151936, 1024, False),
                                       (4096, 6144, True), (1000, 1000, False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_gemv_matches_float32_product(rows, n, k, gated, dtype):
    check_gemv(rows, n, k, gated, dtype, "cuda")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("n,k", [(4096, 1024), (6144, 1024), (3072, 4096), (1000, 1000)])
@pytest.mark.parametrize("has_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_norm_gemv_matches_eager_norm_and_product(rows, n, k, has_residual, dtype):
    check_norm_gemv(rows, n, k, has_residual, dtype, "cuda")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(16, 8, 128), (32, 8, 128), (6, 2, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_qk_norm_rope_store_matches_eager(tokens, heads, kv_heads, head_dim, dtype):
    check_qk_norm_rope_store(tokens, heads, kv_heads, head_dim, dtype, "cuda")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_race_draws_from_softmax(dtype):
    check_race(200_000, dtype, "cuda")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_race_over_slices_draws_the_whole_vocabularys_token(dtype):
    check_race_slices(dtype, "cuda")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_split_decode_matches_softmax(dtype):
    check_split_decode(dtype, "cuda")
