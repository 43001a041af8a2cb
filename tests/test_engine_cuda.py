"""The whole engine on the GPU: greedy agreement with transformers in bf16, and CUDA graphs and every
cache path giving the same tokens as the plain path (in float32, where rounding cannot flip a token)."""
import random

import pytest
import torch

from nanovllm import LLM, SamplingParams
from tests.conftest import make_gpu_model

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NEW_TOKENS = 64
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_gpu_model(str(tmp_path_factory.mktemp("cuda_model")))


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    shared = [rng.randrange(3, 1024) for _ in range(300)]
    return ([[rng.randrange(3, 1024) for _ in range(rng.randint(1, 700))] for _ in range(6)]
            + [shared + [rng.randrange(3, 1024) for _ in range(rng.randint(1, 40))] for _ in range(4)])


def run(path, prompts, **engine):
    llm = LLM(path, **({"kvcache_block_size": 16, "max_model_len": 2048} | engine))
    outputs = [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    return llm, outputs


@pytest.fixture(scope="module")
def bf16_outputs(model_dir, prompts):
    llm, outputs = run(model_dir, prompts)
    assert llm.model_runner.graphs is not None and llm.config.dtype == "bfloat16"
    return outputs


@pytest.fixture(scope="module")
def graph_outputs(model_dir, prompts):
    llm, outputs = run(model_dir, prompts, dtype="float32")
    assert llm.model_runner.graphs is not None
    return outputs


def test_greedy_agrees_with_transformers(model_dir, prompts, bf16_outputs):
    """Teacher-forced, bf16: transformers' argmax after each of our tokens equals our next token on >= 99%
    of positions, and where it differs the two logits are a near-tie: within 3% of the logit, the size of
    the bf16 noise that two implementations of the same network accumulate (transformers' own bf16 logits
    differ from its float32 ones by that much on this model)."""
    from transformers import Qwen3ForCausalLM
    hf = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    agree = total = 0
    worst_gap = torch.zeros(())
    for prompt, completion in zip(prompts, bf16_outputs):
        ids = torch.tensor([prompt + completion], device="cuda")
        with torch.no_grad():
            logits = hf(ids).logits[0, len(prompt) - 1:-1].float()
        hf_choice = logits.argmax(-1)
        ours = torch.tensor(completion, device="cuda")
        agree += int((hf_choice == ours).sum())
        total += len(completion)
        best = logits.gather(1, hf_choice[:, None])
        relative_gap = (best - logits.gather(1, ours[:, None])) / best.abs()
        worst_gap = torch.maximum(worst_gap, relative_gap.max().cpu())
    assert total >= 256 and agree / total >= 0.99, f"{agree}/{total} positions agree"
    assert float(worst_gap) <= 0.03, f"a disagreement that is not a near-tie: {float(worst_gap):.1%} of the logit"


def test_eager_equals_cuda_graphs(model_dir, prompts, graph_outputs):
    _, eager = run(model_dir, prompts, enforce_eager=True, dtype="float32")
    assert eager == graph_outputs


@pytest.mark.parametrize("engine", [
    {"max_num_batched_tokens": 256},                   # chunked prefill
    {"num_kvcache_blocks": 60},                       # preemption (60 x 16 tokens for ~10 sequences)
    {"kvcache_block_size": 256},                       # large blocks
], ids=["chunked-prefill", "preemption", "block-256"])
def test_cache_paths_give_same_tokens(model_dir, prompts, graph_outputs, engine):
    llm, outputs = run(model_dir, prompts, dtype="float32", **engine)
    if "num_kvcache_blocks" in engine:
        assert llm.scheduler.num_preemptions > 0
    assert outputs == graph_outputs


def test_prefix_cache_hits_give_same_tokens(model_dir, prompts, graph_outputs):
    llm, first = run(model_dir, prompts, dtype="float32")
    second = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert sum(o["num_cached_tokens"] for o in second) > 0
    assert [o["token_ids"] for o in second] == graph_outputs == first
