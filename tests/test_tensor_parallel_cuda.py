"""Tensor parallelism on two GPUs (NCCL, bf16, CUDA graphs): the same greedy decisions as one GPU,
every rank's memory freed by exit(), and a dead worker raising instead of hanging."""
import os
import random

import pytest
import torch

from nanovllm import LLM, SamplingParams
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
