"""Outputs as a user sees them: stop strings and stop ids, min_tokens, n samples sharing the prompt's
blocks, logprobs against transformers, seeds, streaming, chat."""
import pytest
import torch
from transformers import Qwen3ForCausalLM

from nanovllm import LLM, SamplingParams
from nanovllm.engine.detokenizer import IncrementalDetokenizer
from tests.conftest import CPU_ENGINE

TEXT_PROMPT = "Once upon a time, a small engine"
GREEDY_24 = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model, **CPU_ENGINE)


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    return Qwen3ForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def greedy(llm) -> dict:
    return llm.generate(TEXT_PROMPT, GREEDY_24, use_tqdm=False)[0]


def first_new(tokens: list[int], avoid=(2,)) -> int:
    """The first index >= 1 whose token did not occur before it and is not in avoid (eos)."""
    return next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i] and tokens[i] not in avoid)


def test_output_dict_has_every_field_and_a_single_token_id_prompt_is_one_request(llm):
    outputs = llm.generate([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(outputs) == 1
    out = outputs[0]
    assert set(out) == {"text", "token_ids", "prompt_token_ids", "finish_reason", "stop_reason",
                        "num_cached_tokens", "logprobs", "outputs"}
    assert out["prompt_token_ids"] == [5, 6, 7] and out["logprobs"] is None
    assert out["outputs"] == [{k: v for k, v in out.items() if k not in ("prompt_token_ids", "outputs")}]


# ---- stop conditions ----------------------------------------------------------------------------------
def boundary_stop_string(llm, tokens: list[int]) -> tuple[str, int]:
    """A two-character string made of the last character of some token's text and the first of the
    next token's, found nowhere earlier in the text. Returns it and where it starts."""
    text = llm.tokenizer.decode(tokens, skip_special_tokens=True)
    for k in range(2, len(tokens)):
        head = llm.tokenizer.decode(tokens[:k], skip_special_tokens=True)
        if head and "\ufffd" not in head and text.startswith(head) and len(text) > len(head):
            stop = text[len(head) - 1:len(head) + 1]
            if text.find(stop) == len(head) - 1:
                return stop, len(head) - 1
    raise AssertionError("no usable token boundary in the greedy text")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_a_token_boundary_cuts_the_text(llm, greedy, include):
    stop, at = boundary_stop_string(llm, greedy["token_ids"])
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=["never there", stop],
                            include_stop_str_in_output=include)
    out = llm.generate(TEXT_PROMPT, params, use_tqdm=False)[0]
    assert out["text"] == greedy["text"][:at + (len(stop) if include else 0)]
    assert (out["finish_reason"], out["stop_reason"]) == ("stop", stop)
    assert out["token_ids"] == greedy["token_ids"][:len(out["token_ids"])] and len(out["token_ids"]) < 24


def test_stop_token_id_ends_generation_and_is_the_stop_reason(llm, greedy):
    i = first_new(greedy["token_ids"])
    stop_id = greedy["token_ids"][i]
    params = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_id], ignore_eos=True)
    out = llm.generate(TEXT_PROMPT, params, use_tqdm=False)[0]
    assert out["token_ids"] == greedy["token_ids"][:i + 1]
    assert (out["finish_reason"], out["stop_reason"]) == ("stop", stop_id)


def test_eos_has_no_stop_reason_and_length_finishes_with_length(llm, greedy, monkeypatch):
    i = first_new(greedy["token_ids"])
    eos = greedy["token_ids"][i]
    monkeypatch.setattr(llm.scheduler, "eos_token_ids", frozenset({eos}))
    out = llm.generate(TEXT_PROMPT, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert out["token_ids"][-1] == eos and (out["finish_reason"], out["stop_reason"]) == ("stop", None)
    assert (greedy["finish_reason"], greedy["stop_reason"]) == ("length", None)


@pytest.mark.parametrize("stop_by", ["eos", "stop_token_ids"])
def test_min_tokens_suppresses_eos_and_stop_token_ids(llm, greedy, monkeypatch, stop_by):
    i = first_new(greedy["token_ids"])
    stop_id = greedy["token_ids"][i]
    kwargs = dict(stop_token_ids=[stop_id], ignore_eos=True) if stop_by == "stop_token_ids" else {}
    if stop_by == "eos":  # the scheduler stops at eos, the sampler suppresses it: both read the config's ids
        monkeypatch.setattr(llm.scheduler, "eos_token_ids", frozenset({stop_id}))
        monkeypatch.setattr(llm.config, "eos_token_ids", (stop_id,))
    min_tokens = i + 3
    out = llm.generate(TEXT_PROMPT, SamplingParams(temperature=0, max_tokens=24, min_tokens=min_tokens, **kwargs),
                       use_tqdm=False)[0]
    assert stop_id not in out["token_ids"][:min_tokens] and len(out["token_ids"]) > min_tokens
    assert out["token_ids"][:i] == greedy["token_ids"][:i]


# ---- n samples ------------------------------------------------------------------------------------------
def test_n_samples_compute_the_prompt_once_and_share_its_blocks(llm, monkeypatch):
    prompt = list(range(300, 340))  # 40 tokens: two full blocks of 16 and a partial one
    computed = []
    run = llm.model_runner.run

    def counting_run(seqs, is_prefill):
        computed.extend(seq.num_scheduled_tokens for seq in seqs if is_prefill)
        return run(seqs, is_prefill)

    monkeypatch.setattr(llm.model_runner, "run", counting_run)
    out = llm.generate([prompt], SamplingParams(n=4, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    assert len(out["outputs"]) == 4 and out["token_ids"] == out["outputs"][0]["token_ids"]
    assert [c["num_cached_tokens"] for c in out["outputs"]] == [0, 32, 32, 32]
    assert sum(computed) == 40 + 3 * 8  # each other sample recomputes only the partial last block
    assert len({tuple(c["token_ids"]) for c in out["outputs"]}) > 1


def test_seeded_n_samples_differ_and_the_first_equals_n_1(llm):
    params = dict(temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    many = llm.generate(TEXT_PROMPT, SamplingParams(n=3, **params), use_tqdm=False)[0]["outputs"]
    again = llm.generate(TEXT_PROMPT, SamplingParams(n=3, **params), use_tqdm=False)[0]["outputs"]
    one = llm.generate(TEXT_PROMPT, SamplingParams(**params), use_tqdm=False)[0]
    assert [c["token_ids"] for c in many] == [c["token_ids"] for c in again]
    assert many[0]["token_ids"] == one["token_ids"] and len({tuple(c["token_ids"]) for c in many}) == 3


# ---- seeds and penalties end to end -------------------------------------------------------------------------
def test_seeded_request_is_reproducible_in_any_batch_and_unseeded_ones_differ(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=3, max_tokens=16, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=9, ignore_eos=True, repetition_penalty=1.3)
    alone = llm.generate(TEXT_PROMPT, seeded, use_tqdm=False)[0]["token_ids"]
    batched = llm.generate(["The quick brown fox", TEXT_PROMPT, [9] * 30], [other, seeded, other], use_tqdm=False)
    assert batched[1]["token_ids"] == alone
    unseeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    runs = {tuple(llm.generate(TEXT_PROMPT, unseeded, use_tqdm=False)[0]["token_ids"]) for _ in range(3)}
    assert len(runs) > 1


def test_greedy_with_repetition_penalty_matches_transformers(llm, hf_model):
    prompt = llm.tokenizer.encode(TEXT_PROMPT)
    out = llm.generate([prompt], SamplingParams(temperature=0, repetition_penalty=1.8, max_tokens=16,
                                                ignore_eos=True), use_tqdm=False)[0]
    expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, repetition_penalty=1.8,
                                 eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert out["token_ids"] == expected


def test_logprobs_equal_transformers_log_softmax(llm, hf_model):
    prompt = llm.tokenizer.encode(TEXT_PROMPT)
    params = SamplingParams(temperature=0.9, top_k=40, seed=1, logprobs=3, max_tokens=8, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + out["token_ids"]])).logits[0, len(prompt) - 1:-1].float()
    reference = logits.log_softmax(-1)
    assert len(out["logprobs"]) == len(out["token_ids"]) == 8
    for step, (token, entry) in enumerate(zip(out["token_ids"], out["logprobs"])):
        assert list(entry)[0] == token
        assert set(entry) == {token, *reference[step].topk(3).indices.tolist()}
        for t, logprob in entry.items():
            assert logprob == pytest.approx(reference[step, t].item(), abs=1e-4)


# ---- streaming ------------------------------------------------------------------------------------------------
STREAM_CASES = {
    "greedy": SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    "seeded": SamplingParams(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True, logprobs=1),
    "stop strings": SamplingParams(temperature=1.0, seed=6, max_tokens=12, stop=["e", "an"]),
    "n=2": SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=8, ignore_eos=True),
}


@pytest.mark.parametrize("case", STREAM_CASES)
def test_streamed_deltas_join_to_the_generate_output(llm, case):
    prompts = [TEXT_PROMPT, "你好，世界。🙂", [7, 8, 9]]
    params = STREAM_CASES[case]
    expected = llm.generate(prompts, params, use_tqdm=False)
    joined, finished = {}, []
    for event in llm.stream(prompts, params):
        key = (event["index"], event["sample_index"])
        assert key not in finished, "an event after the sample's final one"
        text, tokens, logprobs = joined.get(key, ("", [], []))
        joined[key] = (text + event["text"], tokens + event["token_ids"], logprobs + (event["logprobs"] or []))
        if event["finished"]:
            finished.append(key)
    for i, out in enumerate(expected):
        for j, completion in enumerate(out["outputs"]):
            assert joined[i, j] == (completion["text"], completion["token_ids"], completion["logprobs"] or [])
    assert len(finished) == len(prompts) * params.n


def test_stream_closed_early_drops_its_requests(llm):
    stream = llm.stream([TEXT_PROMPT] * 3, SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    assert llm.scheduler.is_finished() and not llm.detokenizers
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_stream_validates_before_iteration(llm):
    with pytest.raises(TypeError, match=r"prompts\[0\]"):
        llm.stream([None])


def test_incremental_detokenizer_is_exact_across_split_characters(llm, monkeypatch):
    text = "你好，世界。🙂 Un café, s'il vous plaît. こんにちは。" * 3
    tokens = llm.tokenizer.encode(text)
    prompt = [5, 6]
    detokenizer = IncrementalDetokenizer(llm.tokenizer, SamplingParams(), len(prompt))
    windows = []
    decode = llm.tokenizer.decode
    monkeypatch.setattr(llm.tokenizer, "decode", lambda ids, **kw: windows.append(len(ids)) or decode(ids, **kw))
    deltas = []
    for k in range(1, len(tokens) + 1):
        detokenizer.update(prompt + tokens[:k], finished=k == len(tokens))
        deltas.append(detokenizer.stream_delta(finished=k == len(tokens)))
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    assert deltas.count("") > 0  # some tokens ended inside a character
    assert max(windows) <= 8 < len(tokens)  # small windows, never the whole sequence


# ---- chat ------------------------------------------------------------------------------------------------
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, Nano-vLLM."}]


def test_chat_applies_the_template_with_the_generation_prompt(llm):
    templated = llm.tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert templated.endswith("<|im_start|>assistant\n")
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    one = llm.chat(CONVERSATION, params, use_tqdm=False)
    two = llm.chat([CONVERSATION, CONVERSATION[1:]], params, use_tqdm=False)
    assert len(one) == 1 and len(two) == 2
    assert one[0]["prompt_token_ids"] == llm.tokenizer.encode(templated, add_special_tokens=False)
    assert two[0]["token_ids"] == one[0]["token_ids"]


@pytest.mark.parametrize("messages,where", [
    ("hello", "messages"), ([{"role": "user"}], r"messages\[0\]\['content'\]"),
    ([CONVERSATION, [{"role": "user", "content": 3}]], r"messages\[1\]\[0\]\['content'\]"),
    ([CONVERSATION, "hello"], r"messages\[1\]"),
])
def test_bad_chat_messages_name_the_place(llm, messages, where):
    with pytest.raises(TypeError, match=where):
        llm.chat(messages, use_tqdm=False)
