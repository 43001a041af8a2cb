"""Turn input rows into requests: an id, one prompt form, and the row's sampling settings."""
from collections.abc import Iterator
from dataclasses import dataclass, fields

from nanovllm.batch.reader import RawRow
from nanovllm.engine.chat import check_conversation
from nanovllm.sampling_params import SamplingParams

PROMPT_KEYS = ("prompt", "prompt_token_ids", "messages")


def sampling_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(SamplingParams) if f.init)


@dataclass
class Request:
    id: str | int
    line: int
    prompt: str | list[int] | None
    messages: list[dict] | None
    sampling_params: SamplingParams


@dataclass
class RowError:
    """A row that cannot be run, with why; reported, never silently dropped."""
    line: int
    id: str | int | None
    message: str


def parse_id(data: dict):
    row_id = data.get("id")
    if row_id is None:
        raise ValueError("missing 'id'; every row needs a unique string or integer id")
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)) or row_id == "":
        raise ValueError(f"'id' must be a non-empty string or an integer, got {row_id!r}")
    return row_id


def parse_prompt(data: dict) -> tuple[str | list[int] | None, list[dict] | None]:
    given = [key for key in PROMPT_KEYS if key in data]
    if len(given) != 1:
        raise ValueError(f"a row needs exactly one of {list(PROMPT_KEYS)}, got {given or 'none'}")
    value = data[given[0]]
    if given[0] == "prompt":
        if not isinstance(value, str) or not value:
            raise ValueError(f"'prompt' must be a non-empty string, got {type(value).__name__}")
        return value, None
    if given[0] == "prompt_token_ids":
        if not (isinstance(value, list) and value
                and all(isinstance(t, int) and not isinstance(t, bool) for t in value)):
            raise ValueError("'prompt_token_ids' must be a non-empty list of integers")
        return value, None
    try:
        check_conversation(value, "messages")  # LLM.chat's own check
    except TypeError as e:
        raise ValueError(str(e)) from None
    return None, value


def parse_request(raw: RawRow, default_sampling: dict) -> Request:
    """Raise ValueError naming the problem; the caller adds the line number."""
    if raw.error is not None:
        raise ValueError(raw.error)
    data = raw.data
    if not isinstance(data, dict):
        raise ValueError(f"a row must be a JSON object, got {type(data).__name__}")
    row_id = parse_id(data)
    prompt, messages = parse_prompt(data)
    allowed = sampling_fields()
    unknown = sorted(set(data) - {"id", *PROMPT_KEYS, *allowed})
    if unknown:
        # A misspelt sampling field would otherwise be ignored and the row run with defaults.
        raise ValueError(f"unknown field(s) {unknown}; a row holds 'id', one of {list(PROMPT_KEYS)} "
                         f"and sampling fields {list(allowed)}")
    overrides = {key: data[key] for key in allowed if key in data}
    try:
        params = SamplingParams(**(default_sampling | overrides))
    except (TypeError, ValueError) as e:
        raise ValueError(f"sampling: {e}") from None
    return Request(row_id, raw.line, prompt, messages, params)


def iter_requests(rows: Iterator[RawRow], default_sampling: dict, done_ids: set,
                  position: str = "line") -> Iterator[Request | RowError | None]:
    """Requests in input order; RowError for a row that cannot run (including a repeated id); None where a
    row was skipped because its id is already in the output, so callers know the rows around it are apart."""
    first_seen = {}  # id -> position of its first row
    for raw in rows:
        row_id = raw.data.get("id") if isinstance(raw.data, dict) else None
        if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
            row_id = None
        if row_id is not None and row_id in first_seen:
            yield RowError(raw.line, row_id, f"duplicate id {row_id!r}, first used on {position} {first_seen[row_id]}")
            continue
        if row_id is not None:
            first_seen[row_id] = raw.line
            if row_id in done_ids:
                yield None
                continue
        try:
            yield parse_request(raw, default_sampling)
        except ValueError as e:
            yield RowError(raw.line, row_id, str(e))
