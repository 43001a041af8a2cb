"""Stream input rows from JSONL or Parquet, each with its 1-based position, without loading the file."""
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_BATCH_ROWS = 1024


@dataclass
class RawRow:
    """One input row: its position in the file and either the parsed object or why it could not be parsed."""
    line: int
    data: object = None
    error: str | None = None


def input_format(path: str) -> str:
    """"jsonl" or "parquet", from the file's suffix."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise ValueError(f"input {path!r} must end with one of {list(JSONL_SUFFIXES + PARQUET_SUFFIXES)} "
                     f"(JSON lines or Parquet)")


def check_parquet_support() -> None:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ValueError("Parquet input needs pyarrow: pip install 'nano-vllm[parquet]'") from None


def position_name(path: str) -> str:
    """What a row's position is called in messages: a line of a JSONL file, a row of a Parquet file."""
    return "line" if input_format(path) == "jsonl" else "row"


def read_rows(path: str) -> Iterator[RawRow]:
    return read_jsonl(path) if input_format(path) == "jsonl" else read_parquet(path)


def read_jsonl(path: str) -> Iterator[RawRow]:
    # Bytes, decoded line by line, so one badly encoded line is reported instead of ending the read.
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines (a trailing one, or spacing) are not rows
            try:
                yield RawRow(line_number, json.loads(raw.decode("utf-8")))
            except UnicodeDecodeError as e:
                yield RawRow(line_number, error=f"not UTF-8 text ({e.reason} at byte {e.start})")
            except json.JSONDecodeError as e:
                yield RawRow(line_number, error=f"not valid JSON ({e.msg} at column {e.colno})")


def read_parquet(path: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq
    row_number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for data in batch.to_pylist():
            row_number += 1
            # A null column value means "not given", as a missing key does in JSON.
            yield RawRow(row_number, {key: value for key, value in data.items() if value is not None})
