"""Bad input, one row each: every misuse raises ValueError / TypeError (FileNotFoundError for paths)
naming the field, before any model work, and the same engine then serves a valid request unchanged."""
import json
import math
import os
import re
import shutil
from dataclasses import MISSING, fields
from types import SimpleNamespace

import pytest
import torch

import nanovllm.llm as llm_facade
from nanovllm import LLM, SamplingParams
from nanovllm.config import Config
from nanovllm.engine import llm_engine
from tests.conftest import CPU_ENGINE

ENGINE = CPU_ENGINE | dict(max_model_len=64, num_kvcache_blocks=8)
VOCAB = 512  # the tiny model's vocabulary
GOOD_PROMPT = [5, 6, 7]
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
NAN = float("nan")


def refuse(*args, **kwargs):
    raise AssertionError("model work started before the bad input was rejected")


@pytest.fixture
def no_model_work(monkeypatch):
    """Building an engine fails the test if it gets as far as loading a tokenizer or a model. The full
    garbage collection LLM runs to free a previous engine's memory is skipped: no model is built here,
    and at ~0.5 s per collection it would dominate these rows."""
    monkeypatch.setattr(llm_engine, "ModelRunner", refuse)
    monkeypatch.setattr(llm_engine, "AutoTokenizer", SimpleNamespace(from_pretrained=refuse))
    monkeypatch.setattr(llm_facade, "_free_unreferenced_device_memory", lambda: None)


# ---- Config: generic rows per field type, then each field's out-of-range values ------------------
def generic_bad_values(kind: type) -> list:
    if kind is bool:
        return [(1, TypeError), ("yes", TypeError)]
    if kind is int:
        return [(True, TypeError), (1.5, TypeError), (NAN, TypeError), ("1", TypeError)]
    if kind is float:
        return [(True, TypeError), (NAN, ValueError), ("0.5", TypeError)]
    if kind is str:
        return [(1, TypeError), (None, TypeError)]
    return []  # other types get explicit rows (checked by test_every_field_has_a_row)


CONFIG_TYPES = {f.name: f.type for f in fields(Config) if f.name in Config.field_names()}
CONFIG_ROWS = [(name, value, error) for name, kind in CONFIG_TYPES.items()
               for value, error in generic_bad_values(kind)] + [
    ("max_num_batched_tokens", 0, ValueError),
    ("max_num_seqs", 0, ValueError),
    ("max_model_len", -1, ValueError),
    ("gpu_memory_utilization", 0.0, ValueError),
    ("gpu_memory_utilization", 1.5, ValueError),
    ("gpu_memory_utilization", math.inf, ValueError),
    ("tensor_parallel_size", 0, ValueError),
    ("tensor_parallel_size", 9, ValueError),
    ("tensor_parallel_size", 3, ValueError),  # does not divide the 4 attention heads
    ("tensor_parallel_size", 4, ValueError),  # divides the 4 attention heads, not the 2 KV heads
    ("kvcache_block_size", 0, ValueError),
    ("kvcache_block_size", 8, ValueError),
    ("kvcache_block_size", 24, ValueError),
    ("kvcache_block_size", -16, ValueError),
    ("prefill_overlap_tokens", -1, ValueError),
    ("num_kvcache_blocks", 0, ValueError),
    ("num_kvcache_blocks", -2, ValueError),
    ("device", "tpu", ValueError),
    ("dtype", "float64", ValueError),
    ("dtype", torch.float32, TypeError),
    ("attention_backend", "flash", ValueError),
]


@pytest.mark.parametrize("name,value,error", CONFIG_ROWS, ids=lambda v: repr(v)[:20])
def test_bad_engine_option(tiny_model, no_model_work, name, value, error):
    with pytest.raises(error, match=name):
        LLM(tiny_model, **(ENGINE | {name: value}))


@pytest.mark.parametrize("model", [5, None, b"/tmp"])
def test_model_of_wrong_type(no_model_work, model):
    with pytest.raises(TypeError, match="model"):
        LLM(model, **ENGINE)


def test_unknown_option_is_named(tiny_model, no_model_work):
    with pytest.raises(TypeError, match="block_sise"):
        LLM(tiny_model, **ENGINE, block_sise=16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_when_there_is_none(tiny_model, no_model_work):
    with pytest.raises(ValueError, match="device='cuda' is not available"):
        LLM(tiny_model, **(ENGINE | {"device": "cuda"}))


def test_tensor_parallel_size_above_the_gpus(tiny_model, no_model_work, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 exceeds the 1 CUDA device"):
        LLM(tiny_model, **(ENGINE | {"device": "cuda", "tensor_parallel_size": 2}))


# ---- the model directory ---------------------------------------------------------------------------
def unsupported(config: dict) -> dict:
    return config | {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def custom_code(config: dict) -> dict:
    return config | {"architectures": ["FooForCausalLM"], "model_type": "foo",
                     "auto_map": {"AutoConfig": "foo.FooConfig"}}


def truncated(weights: bytes) -> bytes:
    return weights[:len(weights) // 2]


# name: (config.json: transform of the good config or raw text or None, weights: transform or None,
#        extra files, error, message)
MODEL_DIRS = {
    "no config.json": (None, lambda w: w, {}, FileNotFoundError, "config.json"),
    "no weights": (lambda c: c, None, {}, FileNotFoundError, "safetensors"),
    "only pytorch_model.bin": (lambda c: c, None, {"pytorch_model.bin": b"\x80\x04pickle"}, FileNotFoundError,
                               "safetensors"),
    "truncated safetensors": (lambda c: c, truncated, {}, ValueError, "truncated or corrupt"),
    "corrupt safetensors": (lambda c: c, lambda w: b"not a safetensors file" * 10, {}, ValueError,
                            "truncated or corrupt"),
    "empty safetensors": (lambda c: c, lambda w: b"", {}, ValueError, "truncated or corrupt"),
    "unsupported architecture": (unsupported, lambda w: w, {}, ValueError, r"architectures=\['LlamaForCausalLM'\]"),
    "custom code": (custom_code, lambda w: w, {}, ValueError, "architectures"),
    "no architectures": (lambda c: {k: v for k, v in c.items() if k != "architectures"}, lambda w: w, {},
                         ValueError, "architectures=None"),
    "config not json": ("{not json", lambda w: w, {}, ValueError, "not valid JSON"),
}


def test_tensor_parallel_vocabulary_above_float32_integers(tiny_model, tmp_path, no_model_work):
    # Ranks share token ids as float32: a larger vocabulary is refused before any weight is read.
    with open(os.path.join(tiny_model, "config.json")) as f:
        config = json.load(f) | {"vocab_size": 2 ** 24 + 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(os.path.join(tiny_model, "model.safetensors"), tmp_path)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 needs a vocab_size of at most 16777216"):
        LLM(str(tmp_path), **(ENGINE | {"tensor_parallel_size": 2}))


@pytest.mark.parametrize("case", MODEL_DIRS)
def test_bad_model_directory(tiny_model, tmp_path, no_model_work, case):
    make_config, make_weights, extra_files, error, message = MODEL_DIRS[case]
    with open(os.path.join(tiny_model, "config.json")) as f:
        good_config = json.load(f)
    with open(os.path.join(tiny_model, "model.safetensors"), "rb") as f:
        good_weights = f.read()
    if make_config is not None:
        text = make_config if isinstance(make_config, str) else json.dumps(make_config(good_config))
        (tmp_path / "config.json").write_text(text)
    if make_weights is not None:
        (tmp_path / "model.safetensors").write_bytes(make_weights(good_weights))
    for name, content in extra_files.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(error, match=message):
        LLM(str(tmp_path), **ENGINE)


@pytest.mark.parametrize("where,error,message", [
    ("missing", FileNotFoundError, "does not exist"),
    ("a file", ValueError, "is not a directory"),
])
def test_model_path_that_is_no_directory(tmp_path, no_model_work, where, error, message):
    path = tmp_path / "model"
    if where == "a file":
        path.write_text("weights?")
    with pytest.raises(error, match=message):
        LLM(str(path), **ENGINE)


# ---- SamplingParams: rows for the fields that exist -------------------------------------------------
SAMPLING_TYPES = {f.name: type(f.default) for f in fields(SamplingParams) if f.default is not MISSING}
SAMPLING_ROWS = [({name: value}, error, name) for name, kind in SAMPLING_TYPES.items()
                 if kind in (bool, int, float) for value, error in generic_bad_values(kind)] + [
    ({"temperature": -0.1}, ValueError, "temperature"),
    ({"temperature": math.inf}, ValueError, "temperature"),
    ({"max_tokens": 0}, ValueError, "max_tokens"),
    ({"max_tokens": None}, TypeError, "max_tokens"),
    ({"top_k": -2}, ValueError, "top_k"),
    ({"top_p": 0.0}, ValueError, "top_p"),
    ({"top_p": 1.01}, ValueError, "top_p"),
    ({"min_p": -0.01}, ValueError, "min_p"),
    ({"min_p": 1.01}, ValueError, "min_p"),
    ({"repetition_penalty": 0.0}, ValueError, "repetition_penalty"),
    ({"presence_penalty": 2.5}, ValueError, "presence_penalty"),
    ({"frequency_penalty": -2.5}, ValueError, "frequency_penalty"),
    ({"seed": "1"}, TypeError, "seed"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"seed": True}, TypeError, "seed"),
    ({"min_tokens": -1}, ValueError, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 2}, ValueError, "min_tokens"),
    ({"stop": 5}, TypeError, "stop"),
    ({"stop": [1]}, TypeError, "stop"),
    ({"stop": [""]}, ValueError, "stop"),
    ({"stop_token_ids": [1.5]}, TypeError, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, ValueError, "stop_token_ids"),
    ({"stop_token_ids": 5}, TypeError, "stop_token_ids"),
    ({"n": 0}, ValueError, "n"),
    ({"logprobs": 1.5}, TypeError, "logprobs"),
    ({"logprobs": True}, TypeError, "logprobs"),
    ({"logprobs": -1}, ValueError, "logprobs"),
]
PRESENT_SAMPLING_ROWS = [row for row in SAMPLING_ROWS if set(row[0]) <= set(SAMPLING_TYPES)]


@pytest.mark.parametrize("kwargs,error,name", PRESENT_SAMPLING_ROWS, ids=lambda v: repr(v)[:30])
def test_bad_sampling_params(kwargs, error, name):
    with pytest.raises(error, match=rf"\b{name}\b"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("cls,rows", [(Config, {row[0] for row in CONFIG_ROWS}),
                                      (SamplingParams, {name for row in SAMPLING_ROWS for name in row[0]})])
def test_every_field_has_a_row(cls, rows):
    names = Config.field_names() if cls is Config else {f.name for f in fields(cls)}
    assert names <= rows, f"{cls.__name__} fields without a bad-input row: {sorted(names - rows)}"


# ---- generate: one engine for every row, checked to serve the same tokens after each --------------
@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model, **ENGINE)


@pytest.fixture(scope="module")
def reference_tokens(llm):
    return llm.generate([GOOD_PROMPT], GREEDY, use_tqdm=False)[0]["token_ids"]


USER = {"role": "user", "content": "Hi"}
# name: (method, arguments besides the defaults below, error, message)
CALL_ROWS = {
    "prompts None": ("generate", dict(prompts=None), TypeError, "prompts"),
    "prompts an int": ("generate", dict(prompts=5), TypeError, "prompts"),
    "prompts a tuple": ("generate", dict(prompts=("a", "b")), TypeError, "prompts"),
    "prompt a dict": ("generate", dict(prompts=[{"text": "a"}]), TypeError, r"prompts\[0\]"),
    "token id a float": ("generate", dict(prompts=[[1, 2.0]]), TypeError, r"prompts\[0\]\[1\]"),
    "token id NaN": ("generate", dict(prompts=[[1, NAN]]), TypeError, r"prompts\[0\]\[1\]"),
    "token id a bool": ("generate", dict(prompts=[[True]]), TypeError, r"prompts\[0\]\[0\]"),
    "token id a str": ("generate", dict(prompts=[1, "a"]), TypeError, r"prompts\[0\]\[1\]"),
    "empty text": ("generate", dict(prompts=""), ValueError, r"prompts\[0\] is empty"),
    "empty token list": ("generate", dict(prompts=[[]]), ValueError, r"prompts\[0\] is empty"),
    "empty prompt after a good one": ("generate", dict(prompts=[GOOD_PROMPT, ""]), ValueError,
                                      r"prompts\[1\] is empty"),
    "token id below 0": ("generate", dict(prompts=[[1, -1]]), ValueError,
                         r"token id -1, outside the vocabulary \[0, 512\)"),
    "token id at vocab size": ("generate", dict(prompts=[[VOCAB]]), ValueError, "token id 512, outside the vocabulary"),
    "prompt of max_model_len": ("generate", dict(prompts=[[1] * 64]), ValueError, "max_model_len=64"),
    "too few sampling params": ("generate", dict(prompts=[[1], [2]], sampling_params=[GREEDY]), ValueError,
                                "sampling_params"),
    "too many sampling params": ("generate", dict(prompts=[[1]], sampling_params=[GREEDY] * 2), ValueError,
                                 "sampling_params"),
    "sampling params a dict": ("generate", dict(prompts=[[1]], sampling_params={"temperature": 0}), TypeError,
                               "sampling_params"),
    "sampling params a str": ("generate", dict(prompts=[[1]], sampling_params="greedy"), TypeError,
                              "sampling_params"),
    "None among sampling params": ("generate", dict(prompts=[[1], [2]], sampling_params=[GREEDY, None]), TypeError,
                                   "sampling_params"),
    "stop token id at vocab size": ("generate", dict(prompts=[[1]], sampling_params=SamplingParams(
        stop_token_ids=[VOCAB])), ValueError, "stop_token_ids"),
    "use_tqdm a str": ("generate", dict(prompts=[[1]], use_tqdm="no"), TypeError, "use_tqdm"),
    "messages None": ("chat", dict(messages=None), TypeError, "messages"),
    "message without content": ("chat", dict(messages=[{"role": "user"}]), TypeError,
                                r"messages\[0\]\['content'\]"),
    "conversation not a list": ("chat", dict(messages=[[USER], USER]), TypeError, r"messages\[1\]"),
    "chat_template_kwargs a str": ("chat", dict(messages=[USER], chat_template_kwargs="x"), TypeError,
                                   "chat_template_kwargs"),
    "chat with too few sampling params": ("chat", dict(messages=[[USER], [USER]], sampling_params=[GREEDY]),
                                          ValueError, "sampling_params"),
    "stream prompts None": ("stream", dict(prompts=None), TypeError, "prompts"),
    "stream token id below 0": ("stream", dict(prompts=[[-1]]), ValueError, "outside the vocabulary"),
}
DEFAULT_ARGUMENTS = {"generate": dict(sampling_params=GREEDY, use_tqdm=False),
                     "chat": dict(sampling_params=GREEDY, use_tqdm=False), "stream": dict(sampling_params=GREEDY)}


@pytest.mark.parametrize("case", CALL_ROWS)
def test_bad_call_leaves_the_engine_serving(llm, reference_tokens, monkeypatch, case):
    method, kwargs, error, message = CALL_ROWS[case]
    with monkeypatch.context() as patch:
        patch.setattr(llm.model_runner, "run", refuse)
        with pytest.raises(error, match=message):
            getattr(llm, method)(**(DEFAULT_ARGUMENTS[method] | kwargs))  # stream raises before iteration
    assert llm.scheduler.is_finished()
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    assert llm.generate([GOOD_PROMPT], GREEDY, use_tqdm=False)[0]["token_ids"] == reference_tokens


@pytest.mark.parametrize("sampling_params", [GREEDY, []])
def test_empty_prompt_list_returns_empty_list(llm, sampling_params):
    assert llm.generate([], sampling_params, use_tqdm=False) == []
    assert llm.chat([], sampling_params, use_tqdm=False) == []
    assert list(llm.stream([], sampling_params)) == []


@pytest.mark.parametrize("prompt_len,expected_tokens", [(63, 1), (61, 3), (54, 10)])
def test_generation_is_capped_at_max_model_len(llm, prompt_len, expected_tokens):
    """Policy (README, Limits): prompt + max_tokens may exceed max_model_len; generation stops there."""
    out = llm.generate([[7] * prompt_len], SamplingParams(max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    assert len(out["token_ids"]) == expected_tokens and out["finish_reason"] == "length"


def test_error_messages_name_the_allowed_values(tiny_model, no_model_work):
    with pytest.raises(ValueError, match=re.escape("dtype must be one of ['auto', 'float32', 'float16', 'bfloat16']")):
        LLM(tiny_model, **(ENGINE | {"dtype": "fp8"}))
