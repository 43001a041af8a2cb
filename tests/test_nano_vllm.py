"""The public API as a user meets it: text and token-id prompts, order, limits, eos, finish reasons."""
import pytest

from nanovllm import LLM, SamplingParams
from tests.conftest import CPU_ENGINE


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model, **CPU_ENGINE)


def test_text_prompts_give_text_back(llm):
    outputs = llm.generate(["Hello, Nano-vLLM.", "The quick brown fox"],
                           SamplingParams(temperature=0.7, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert len(outputs) == 2
    for prompt, out in zip(["Hello, Nano-vLLM.", "The quick brown fox"], outputs):
        assert out["prompt_token_ids"] == llm.tokenizer.encode(prompt)
        assert len(out["token_ids"]) == 8
        assert out["text"] == llm.tokenizer.decode(out["token_ids"], skip_special_tokens=True)


def test_token_id_prompts_and_output_order(llm):
    prompts = [[10 + i] * (1 + 7 * i) for i in range(6)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert [o["prompt_token_ids"] for o in outputs] == prompts
    # Order does not depend on batch position: each prompt alone gives the same tokens.
    alone = [llm.generate([p], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
             for p in prompts]
    assert [o["token_ids"] for o in outputs] == [o["token_ids"] for o in alone]


def test_single_prompt_is_one_request_not_one_per_character(llm):
    outputs = llm.generate("Hello", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(outputs) == 1 and outputs[0]["prompt_token_ids"] == llm.tokenizer.encode("Hello")


@pytest.mark.parametrize("max_tokens", [1, 5, 17])
def test_max_tokens_is_respected_with_length_reason(llm, max_tokens):
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)[0]
    assert len(out["token_ids"]) == max_tokens and out["finish_reason"] == "length"


def eos_prompt(llm) -> tuple[list[int], int]:
    """A prompt whose greedy continuation reaches some token t; pretend t is eos."""
    prompt = [40, 41, 42]
    tokens = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)[0]["token_ids"]
    return prompt, tokens


def test_eos_stops_generation_unless_ignored(llm, monkeypatch):
    prompt, tokens = eos_prompt(llm)
    stop_at = tokens[3]
    monkeypatch.setattr(llm.scheduler, "eos_token_ids", frozenset({stop_at}))
    greedy = SamplingParams(temperature=0, max_tokens=6)
    out = llm.generate([prompt], greedy, use_tqdm=False)[0]
    assert out["token_ids"] == tokens[:tokens.index(stop_at) + 1] and out["finish_reason"] == "stop"
    ignored = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    assert ignored["token_ids"] == tokens and ignored["finish_reason"] == "length"


def test_eos_ids_come_from_the_model_config(llm):
    assert llm.config.eos_token_ids == (2,)
    assert llm.scheduler.eos_token_ids == {2}


def test_per_prompt_sampling_params(llm):
    params = [SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
              SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True)]
    outputs = llm.generate([[1, 2, 3], [4, 5, 6]], params, use_tqdm=False)
    assert [len(o["token_ids"]) for o in outputs] == [2, 5]


def test_generation_stops_at_max_model_len(tiny_model):
    llm = LLM(tiny_model, **(CPU_ENGINE | {"max_model_len": 20}))
    out = llm.generate([[3] * 15], SamplingParams(max_tokens=50, ignore_eos=True), use_tqdm=False)[0]
    assert len(out["token_ids"]) == 5 and out["finish_reason"] == "length"


def test_progress_bar_shows_throughput(llm, capsys):
    llm.generate([[1, 2, 3]] * 3, SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "tok/s" in err
