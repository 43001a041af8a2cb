import math
from dataclasses import dataclass


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


@dataclass
class SamplingParams:
    """How to sample one request. temperature=0 means greedy."""
    temperature: float = 1.0
    max_tokens: int = 64
    ignore_eos: bool = False

    def __post_init__(self):
        check_number("temperature", self.temperature, 0.0, 1e4)
        check_number("max_tokens", self.max_tokens, 1, integer=True)
        check_type("ignore_eos", self.ignore_eos, bool, "a bool")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
