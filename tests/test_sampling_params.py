"""SamplingParams: vLLM's defaults and meanings, and every bad value rejected with the field's name."""
import math

import pytest

from nanovllm import SamplingParams
from nanovllm.sampling_params import MAX_LOGPROBS


def test_defaults_turn_every_control_off():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (1.0, 0, 1.0, 0.0)
    assert not p.uses_top_k and not p.uses_penalties and not p.is_greedy
    assert (p.seed, p.stop, p.stop_token_ids, p.logprobs, p.n, p.min_tokens) == (None, None, None, None, 1, 0)
    assert p.skip_special_tokens and not p.include_stop_str_in_output


@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_zero_and_minus_one_are_off(top_k):
    assert not SamplingParams(top_k=top_k).uses_top_k


def test_a_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0), dict(top_k=1), dict(top_p=0.01), dict(min_p=1.0), dict(repetition_penalty=0.5),
    dict(presence_penalty=-2.0), dict(frequency_penalty=2.0), dict(seed=-5), dict(seed=2**80),
    dict(min_tokens=64, max_tokens=64), dict(stop_token_ids=[0, 7]), dict(stop=[]), dict(n=4),
    dict(logprobs=0), dict(logprobs=MAX_LOGPROBS),
], ids=repr)
def test_edge_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


BAD = [
    (dict(temperature=-0.1), ValueError), (dict(temperature=math.nan), ValueError),
    (dict(temperature="0.5"), TypeError), (dict(top_k=-2), ValueError), (dict(top_k=2.0), TypeError),
    (dict(top_k=True), TypeError), (dict(top_p=0.0), ValueError), (dict(top_p=1.5), ValueError),
    (dict(top_p=math.nan), ValueError), (dict(min_p=-0.1), ValueError), (dict(min_p=1.1), ValueError),
    (dict(repetition_penalty=0.0), ValueError), (dict(repetition_penalty=math.inf), ValueError),
    (dict(presence_penalty=2.1), ValueError), (dict(frequency_penalty=-2.1), ValueError),
    (dict(frequency_penalty=math.nan), ValueError), (dict(seed=1.0), TypeError), (dict(seed=True), TypeError),
    (dict(max_tokens=0), ValueError), (dict(min_tokens=-1), ValueError), (dict(min_tokens=1.0), TypeError),
    (dict(stop=3), TypeError), (dict(stop=["ok", None]), TypeError), (dict(stop=[""]), ValueError),
    (dict(stop_token_ids=5), TypeError), (dict(stop_token_ids=[-1]), ValueError),
    (dict(stop_token_ids=[True]), TypeError), (dict(include_stop_str_in_output=1), TypeError),
    (dict(ignore_eos=None), TypeError), (dict(skip_special_tokens="no"), TypeError), (dict(n=0), ValueError),
    (dict(n=2.0), TypeError), (dict(logprobs=-1), ValueError), (dict(logprobs=MAX_LOGPROBS + 1), ValueError),
    (dict(logprobs=True), TypeError),
]


@pytest.mark.parametrize("kwargs,error", BAD, ids=[repr(k) for k, _ in BAD])
def test_bad_values_name_the_field(kwargs, error):
    name = next(iter(kwargs))
    with pytest.raises(error, match=rf"\b{name}\b"):
        SamplingParams(**kwargs)


def test_min_tokens_above_max_tokens_names_both():
    with pytest.raises(ValueError, match=r"min_tokens=5 must not exceed max_tokens=2"):
        SamplingParams(min_tokens=5, max_tokens=2)
