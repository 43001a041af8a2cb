"""Tensor parallelism on two GPUs (NCCL, bf16, CUDA graphs): the same greedy decisions as one GPU,
every rank's memory freed by exit(), a dead worker raising instead of hanging, and the peer all-reduce
equal to NCCL's."""
import os
import random
import socket
import threading
import time

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.utils.distributed import create_group, open_store
from tests.conftest import generate_while_killing_worker, make_gpu_model

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

ENGINE = {"kvcache_block_size": 16, "max_model_len": 1024, "max_num_seqs": 64, "gpu_memory_utilization": 0.5}
GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_gpu_model(str(tmp_path_factory.mktemp("tp_cuda_model")))


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [[rng.randrange(3, 1024) for _ in range(rng.randint(1, 300))] for _ in range(48)]


def greedy_tokens(llm, prompts):
    return [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def same_history_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """The share of next-token decisions made from the same history that agree: each sequence counts
    its positions up to and including its first difference (after it, histories differ)."""
    agree = decisions = 0
    for x, y in zip(a, b):
        common = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), len(x))
        agree += common
        decisions += common + (common < len(x))
    return agree / decisions


def test_two_gpus_agree_with_one_and_free_their_memory(model_dir, prompts):
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated(0)
    with LLM(model_dir, **ENGINE) as one_gpu:
        assert one_gpu.model_runner.graphs is not None
        single = greedy_tokens(one_gpu, prompts)
    with LLM(model_dir, tensor_parallel_size=2, **ENGINE) as two_gpus:
        assert two_gpus.model_runner.graphs is not None
        pids = [p.pid for p in two_gpus.workers.processes]
        parallel = greedy_tokens(two_gpus, prompts)
    assert same_history_agreement(single, parallel) >= 0.99
    assert torch.cuda.memory_allocated(0) <= baseline + 2**20
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)


def test_killed_worker_raises_within_seconds(model_dir, prompts, monkeypatch):
    llm = LLM(model_dir, tensor_parallel_size=2, **ENGINE)
    worker = llm.workers.processes[0].pid
    # Mid-decode: rank 0 is about to wait in an NCCL all-reduce.
    outcome, seconds = generate_while_killing_worker(llm, monkeypatch, lambda: greedy_tokens(llm, prompts),
                                                     worker, kill_at_call=5, deadline=60)
    assert seconds < 20
    assert outcome and "rank 1" in str(outcome[0])
    llm.exit()


def _peer_all_reduce_rank(rank: int, port: int) -> None:
    """One rank of test_peer_all_reduce_matches_nccl (a spawned process; an assertion fails the test)."""
    from nanovllm.utils.peer_all_reduce import max_words  # imports Triton

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    group = create_group(open_store(rank, 2, port), rank, 2, device)
    assert group.peer is not None, "two GPUs with peer access must use the peer all-reduce"

    def both_ranks(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
        generator = torch.Generator(device).manual_seed(seed * 2 + rank)
        return torch.randn(numel, generator=generator, device=device).to(dtype)

    def nccl_sum(x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        torch.distributed.all_reduce(y, group=group.group)
        return y

    def same_on_both_ranks(y: torch.Tensor) -> None:
        other = [torch.empty_like(y) for _ in range(2)]
        torch.distributed.all_gather(other, y, group=group.group)
        assert torch.equal(other[0], other[1]), "the ranks' sums differ"

    # Eager, every size class: one word, partial and whole chunks of 1024 words, the largest message it
    # takes (more chunks than programs, so each program loops).
    words = max_words(2)
    bf16 = dict(dtype=torch.bfloat16, device=device)
    assert not group.peer.fits(torch.zeros(2 * words + 2, **bf16)), "larger than the buffers: NCCL's"
    assert not group.peer.fits(torch.zeros(4097, **bf16)), "an odd number of 16-bit elements: NCCL's"
    assert not group.peer.fits(torch.zeros(4097, **bf16)[1:]), "not 4-byte aligned: NCCL's"
    odd_rows = both_ranks(6, torch.bfloat16, 99).view(2, 3)  # rows of an odd number of elements, whole words in all
    assert group.peer.fits(odd_rows)
    torch.testing.assert_close(group.peer.all_reduce(odd_rows.clone()), nccl_sum(odd_rows))
    for seed, (dtype, numel) in enumerate([(torch.bfloat16, n) for n in (2, 1000, 2048, 2050, 8192, 2 * words)]
                                          + [(torch.float32, n) for n in (1, 1000, 1024, 4097, words)]):
        x = both_ranks(numel, dtype, seed)
        assert group.peer.fits(x)
        expected = nccl_sum(x)
        got = group.peer.all_reduce(x.clone())
        torch.testing.assert_close(got, expected)  # a stale slot or a missing addend is off by O(1)
        same_on_both_ranks(got)

    # The all-reduce with the decoder's add and RMSNorm after it (all_reduce_norm) against NCCL's sum and
    # the eager ops; with and without a residual, more rows than programs, and plain all-reduces of other
    # sizes in between (each kernel has its own slots and epochs: a mix-up would hang or read stale data).
    from nanovllm.layers.ops import add_rms_norm, rms_norm

    def same_on_all(shape, seed: int) -> torch.Tensor:  # residuals and norm weights are alike on every rank
        generator = torch.Generator(device).manual_seed(1000 + seed)
        return torch.randn(shape, generator=generator, device=device).to(torch.bfloat16)

    hidden, eps = 4096, 1e-6
    weight = same_on_all(hidden, 0)
    assert not group.peer.fits_norm(both_ranks(2 * hidden, torch.bfloat16, 0).view(2, hidden), None, weight)
    for width in (512, 8192, 4100):  # outside NORM_ROW_ELEMENTS; not a multiple of 8
        rows = both_ranks(8 * width, torch.bfloat16, 0).view(8, width)
        assert not group.peer.fits_norm(rows, None, same_on_all(width, 0))
    unaligned = both_ranks(8 * hidden + 2, torch.bfloat16, 0)[2:].view(8, hidden)  # 4 bytes past 16-byte alignment
    assert group.peer.fits(unaligned) and not group.peer.fits_norm(unaligned, None, weight)
    for seed, (rows, has_residual) in enumerate([(3, False), (3, True), (64, True), (257, True), (300, False)]):
        x = both_ranks(rows * hidden, torch.bfloat16, 200 + seed).view(rows, hidden)
        residual = same_on_all((rows, hidden), seed) if has_residual else None
        assert group.peer.fits_norm(x, residual, weight)
        total = nccl_sum(x)
        expected = add_rms_norm(total, residual, weight, eps) if has_residual else (rms_norm(total, weight, eps), total)
        normed, new_residual = group.peer.all_reduce_norm(x, residual, weight, eps)
        torch.testing.assert_close(new_residual, expected[1])
        torch.testing.assert_close(normed, expected[0])
        same_on_both_ranks(normed)
        plain = both_ranks(1000 + 2 * seed, torch.bfloat16, 300 + seed)
        torch.testing.assert_close(group.peer.all_reduce(plain.clone()), nccl_sum(plain))
    # The first call fixed the row width (a row's epoch belongs to its place in the slots).
    assert not group.peer.fits_norm(both_ranks(8 * 1024, torch.bfloat16, 0).view(8, 1024), None, weight[:1024])

    # In a CUDA graph, replayed many times on new inputs, as decoding does: one row of Qwen3-8B's hidden
    # states, 8 rows, 256 rows (2 MB).
    static = torch.empty(256 * 4096, dtype=torch.bfloat16, device=device)
    warm = static.clone()
    group.peer.all_reduce(warm)  # compile outside the capture
    sizes = [4096, 8 * 4096, 256 * 4096]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = [group.peer.all_reduce(static[:size].clone()) for size in sizes]
    for replay in range(50):
        static.copy_(both_ranks(static.numel(), torch.bfloat16, 100 + replay))
        expected = nccl_sum(static)
        graph.replay()
        for size, out in zip(sizes, outputs):
            torch.testing.assert_close(out, expected[:size])

    # all_reduce_norm in a graph, between plain all-reduces, as a decode step of 64 rows runs it.
    rows = 64
    static_x, static_residual = static[:rows * hidden].view(rows, hidden), same_on_all((rows, hidden), 9)
    group.peer.all_reduce_norm(static_x, static_residual, weight, eps)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        before = group.peer.all_reduce(static_x.clone())
        normed, new_residual = group.peer.all_reduce_norm(static_x, static_residual, weight, eps)
        after = group.peer.all_reduce(static[:8 * hidden].clone())
    for replay in range(20):
        static.copy_(both_ranks(static.numel(), torch.bfloat16, 400 + replay))
        total = nccl_sum(static_x)
        expected_normed, expected_residual = add_rms_norm(total, static_residual, weight, eps)
        graph.replay()
        torch.testing.assert_close(before, total)
        torch.testing.assert_close(new_residual, expected_residual)
        torch.testing.assert_close(normed, expected_normed)
        torch.testing.assert_close(after, nccl_sum(static[:8 * hidden]))

    # Past 65,536 all-reduces of a row, where its 16-bit epoch wraps: every call still the sum. The
    # graph's calls take different inputs, so a word taken from its slot's previous epoch (two calls
    # earlier) would show.
    rows, calls = 3, 64
    inputs = both_ranks(calls * rows * hidden, torch.bfloat16, 500).view(calls, rows, hidden)
    wrap_residual = same_on_all((rows, hidden), 10)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        results = [group.peer.all_reduce_norm(x, wrap_residual, weight, eps) for x in inputs]
        normed = torch.cat([result[0] for result in results])
        new_residual = torch.cat([result[1] for result in results])
    expected_normed, expected_residual = add_rms_norm(nccl_sum(inputs).view(-1, hidden),
                                                      wrap_residual.repeat(calls, 1), weight, eps)
    for _ in range(2**16 // calls + 2):
        graph.replay()
        torch.testing.assert_close(new_residual, expected_residual)
        torch.testing.assert_close(normed, expected_normed)

    # A rank that never arrives: abort() releases the waiting rank within moments.
    torch.cuda.synchronize(device)
    torch.distributed.all_reduce(torch.zeros(1, device=device), group=group.group)
    torch.cuda.synchronize(device)
    if rank == 0:
        threading.Timer(1.0, group.peer.abort).start()
        started = time.perf_counter()
        group.peer.all_reduce(torch.ones(4096, device=device))
        torch.cuda.synchronize(device)
        assert time.perf_counter() - started < 10
    else:
        time.sleep(3)
    group.abort()


def test_peer_all_reduce_matches_nccl():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_peer_all_reduce_rank, args=(port,), nprocs=2, join=True)
