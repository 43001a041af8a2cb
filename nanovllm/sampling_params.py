import math
from dataclasses import dataclass

# Bounds the per-step logprobs work and transfer (vLLM's default max_logprobs is also 20).
MAX_LOGPROBS = 20


def check_type(name: str, value, types, what: str) -> None:
    # bool is an int in Python; a flag passed where a number belongs is almost always a mistake.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise TypeError(f"{name} must be {what}, got bool {value!r}")
    if not isinstance(value, types):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")


def check_number(name: str, value, low=None, high=None, *, integer=False, low_open=False) -> None:
    """Type and range check with a message naming the field and the allowed range."""
    check_type(name, value, int if integer else (int, float), "an int" if integer else "a number")
    if not integer and math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        left = "(" if low_open else "["
        raise ValueError(f"{name} must be in {left}{low if low is not None else '-inf'}, "
                         f"{high if high is not None else 'inf'}], got {value!r}")
    if not integer and math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def check_int_list(name: str, value) -> None:
    check_type(name, value, (list, tuple), "a list of int")
    for i, item in enumerate(value):
        check_number(f"{name}[{i}]", item, 0, integer=True)


@dataclass
class SamplingParams:
    """How to sample one request; vLLM's names and meanings.

    temperature: 0 is greedy. top_k: keep the k most likely tokens (0 or -1: off). top_p: keep the smallest
    set of most likely tokens whose mass reaches top_p, the token that crosses it included (1: off).
    min_p: drop tokens less likely than min_p times the most likely one (0: off).
    repetition_penalty: transformers' rule over prompt and generated tokens (positive logits divided,
    negative multiplied; 1: off). presence_penalty / frequency_penalty: OpenAI's rule over generated
    tokens (logit -= presence * [count > 0] + frequency * count; 0: off).
    seed: makes this request's samples reproducible whatever else is in the batch.
    max_tokens / min_tokens: at most / at least this many generated tokens (eos and stop_token_ids are
    suppressed before min_tokens). stop: strings that end the text (cut before the string unless
    include_stop_str_in_output). stop_token_ids: token ids that end generation (kept in token_ids).
    n: completions per prompt, sharing the prompt's KV blocks. logprobs: return the log-probabilities of
    each sampled token and of the `logprobs` most likely tokens (None: off; 0: the sampled token only).
    """
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 64
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    logprobs: int | None = None

    def __post_init__(self):
        check_number("temperature", self.temperature, 0.0, 1e4)
        check_number("top_k", self.top_k, -1, integer=True)
        check_number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        check_number("min_p", self.min_p, 0.0, 1.0)
        check_number("repetition_penalty", self.repetition_penalty, 0.0, 1e4, low_open=True)
        check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None:
            check_type("seed", self.seed, int, "an int or None")
        check_number("max_tokens", self.max_tokens, 1, integer=True)
        check_number("min_tokens", self.min_tokens, 0, integer=True)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} must not exceed max_tokens={self.max_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            check_type("stop", self.stop, (list, tuple), "a str, a list of str or None")
            for i, s in enumerate(self.stop):
                check_type(f"stop[{i}]", s, str, "a str")
                if not s:
                    raise ValueError(f"stop[{i}] is empty; a stop string needs at least one character")
            self.stop = list(self.stop)
        if self.stop_token_ids is not None:
            check_int_list("stop_token_ids", self.stop_token_ids)
            self.stop_token_ids = list(self.stop_token_ids)
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            check_type(name, getattr(self, name), bool, "a bool")
        check_number("n", self.n, 1, integer=True)
        if self.logprobs is not None:
            check_number("logprobs", self.logprobs, 0, MAX_LOGPROBS, integer=True)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_top_k(self) -> bool:
        return self.top_k > 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
