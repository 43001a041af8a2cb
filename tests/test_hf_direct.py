"""Greedy generation equals Hugging Face transformers token for token (CPU, float32), across model
shapes and across the engine's cache paths: prefix hits, chunked prefill and preemption."""
import random

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.testing.checkpoints import make_random_checkpoint
from tests.conftest import CPU_ENGINE, hf_greedy

MODEL_SHAPES = {
    "tied-gqa2": {},
    "untied-mqa-wide-heads": {"tie_word_embeddings": False, "num_key_value_heads": 1, "head_dim": 32},
    "mha-bias": {"num_key_value_heads": 4, "attention_bias": True},
    "gqa4-small-heads": {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8},
}
MAX_NEW = 24
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


def make_prompts(seed: int, count: int, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 512) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(3, 512) for _ in range(rng.randint(1, 70))] for _ in range(count)]


@pytest.fixture(scope="module", params=list(MODEL_SHAPES))
def model_and_reference(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    make_random_checkpoint(path, overrides=MODEL_SHAPES[request.param], seed=len(request.param))
    prompts = make_prompts(1, 6) + make_prompts(2, 4, shared_prefix=40)
    return path, prompts, hf_greedy(path, prompts, MAX_NEW)


def generate(path, prompts, **engine):
    llm = LLM(path, **(CPU_ENGINE | engine))
    return llm, [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_batch_of_different_lengths_matches_hf(model_and_reference):
    path, prompts, reference = model_and_reference
    _, outputs = generate(path, prompts)
    assert outputs == reference


def test_prefix_cache_hits_give_same_tokens(model_and_reference):
    path, prompts, reference = model_and_reference
    llm, first = generate(path, prompts)
    second = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert first == reference
    assert [o["token_ids"] for o in second] == reference
    # Every prompt of the second run is served from the cache except its last, partial block.
    assert all(o["num_cached_tokens"] == (len(p) - 1) // 16 * 16 for o, p in zip(second, prompts))
    assert sum(o["num_cached_tokens"] for o in second) > 0


def test_chunked_prefill_gives_same_tokens(model_and_reference):
    path, prompts, reference = model_and_reference
    _, outputs = generate(path, prompts, max_num_batched_tokens=7)
    assert outputs == reference


def test_preemption_gives_same_tokens(model_and_reference):
    path, prompts, reference = model_and_reference
    # 12 blocks of 16 tokens hold about one long sequence: the rest are preempted and recomputed.
    llm, outputs = generate(path, prompts, num_kvcache_blocks=12)
    assert llm.scheduler.num_preemptions > 0
    assert outputs == reference
