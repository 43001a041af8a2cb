"""Many requests, and a KV cache too small for them: every request finishes, in order, with the
tokens an unconstrained run gives; a request that can never fit is refused at once."""
import random
import re

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.sequence import Sequence
from tests.conftest import CPU_ENGINE

# Room for 1024 short sequences at once (one 16-token block each): the 10,000 requests run in ~10 waves.
LARGE = CPU_ENGINE | dict(max_num_seqs=1024, max_num_batched_tokens=4096, num_kvcache_blocks=1100)
# 8 blocks of 16 tokens: a few sequences of ~70 tokens cannot all stay resident.
SMALL = CPU_ENGINE | dict(num_kvcache_blocks=8)
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are microseconds long; a second intra-op thread only adds synchronization
    (on a busy 2-core machine it makes the 10,000-request run several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def large(tiny_model):
    return LLM(tiny_model, **LARGE)


@pytest.fixture(scope="module")
def small(tiny_model):
    return LLM(tiny_model, **SMALL)


def test_ten_thousand_short_requests_all_finish_in_order(large):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 8) for _ in range(rng.randint(1, 4))] for _ in range(10_000)]
    params = SamplingParams(max_tokens=2, **GREEDY)
    outputs = large.generate(prompts, params, use_tqdm=False)
    assert len(outputs) == len(prompts)
    assert all(o["prompt_token_ids"] == p for o, p in zip(outputs, prompts))
    assert all(len(o["token_ids"]) == 2 and o["finish_reason"] == "length" for o in outputs)
    # In order: each output carries its own prompt's greedy tokens, as a run of the distinct prompts gives.
    distinct = sorted(set(map(tuple, prompts)))
    alone = large.generate([list(p) for p in distinct], params, use_tqdm=False)
    expected = {p: o["token_ids"] for p, o in zip(distinct, alone)}
    assert [o["token_ids"] for o in outputs] == [expected[tuple(p)] for p in prompts]
    assert large.block_manager.num_free_blocks == large.block_manager.num_blocks


def test_preemption_gives_the_unconstrained_outputs_and_is_reported(large, small, capsys):
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(20, 30))] for _ in range(6)]
    params = SamplingParams(max_tokens=40, **GREEDY)
    expected = [o["token_ids"] for o in large.generate(prompts, params, use_tqdm=False)]
    before = small.scheduler.num_preemptions
    outputs = small.generate(prompts, params, use_tqdm=True)
    preemptions = small.scheduler.num_preemptions - before
    assert [o["token_ids"] for o in outputs] == expected
    assert preemptions > 0
    shown = re.findall(r"preemptions (\d+)", capsys.readouterr().err)
    assert shown and int(shown[-1]) == small.scheduler.num_preemptions
    assert small.block_manager.num_free_blocks == small.block_manager.num_blocks


@pytest.mark.parametrize("prompt_len,max_tokens,message", [
    (200, 1, r"needs up to 201 tokens \(13 KV blocks of 16\), but the KV cache holds only 8 blocks"),
    (60, 100, r"needs up to 160 tokens \(10 KV blocks of 16\), but the KV cache holds only 8 blocks"),
])
def test_request_larger_than_the_whole_cache_is_refused(small, prompt_len, max_tokens, message):
    with pytest.raises(ValueError, match=message):
        small.generate([[1, 2, 3], [5] * prompt_len], SamplingParams(max_tokens=max_tokens, **GREEDY),
                       use_tqdm=False)
    assert small.scheduler.is_finished()
    out = small.generate([[1, 2, 3]], SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)[0]
    assert len(out["token_ids"]) == 2


def test_unschedulable_request_stops_the_loop_instead_of_spinning(small):
    """Even past intake's check, a request that cannot be scheduled ends generate with an error."""
    seq = Sequence([5] * 200, SamplingParams(max_tokens=1), small.config.kvcache_block_size)
    small.scheduler.add(seq)
    try:
        with pytest.raises(RuntimeError, match="nothing to run"):
            small.step()
    finally:
        small.scheduler.abort([seq])
    assert small.scheduler.is_finished()
