"""Where results go: whole chunks written atomically beside the output, merged into it when the job is done.

A crash can happen at any moment. Every file is written under a temporary name, synced and then renamed,
so a reader sees either the whole file or none of it; a row counts as done only once its part file exists.
Rerunning the job reads the ids already written and skips them.
"""
import glob
import json
import os
import shutil
from collections.abc import Iterator

from nanovllm.batch.requests import RowError


def write_atomically(path: str, lines: Iterator[str]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
    os.replace(tmp, path)


def json_line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


class OutputStore:
    def __init__(self, output: str):
        self.output = output
        # Part files are named by the input position of their first row, so sorting them restores input order.
        self.parts_dir = output + ".parts"
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        for path in glob.glob(os.path.join(glob.escape(self.parts_dir), "*.tmp")) + glob.glob(
                glob.escape(self.output) + ".tmp"):
            os.remove(path)

    def part_paths(self) -> list[str]:
        return sorted(glob.glob(os.path.join(glob.escape(self.parts_dir), "part-*.jsonl")))

    def _finished_files(self) -> list[str]:
        return ([self.output] if os.path.exists(self.output) else []) + self.part_paths()

    def _rows(self, path: str) -> Iterator[tuple[object, str]]:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                try:
                    yield json.loads(line)["id"], line
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path} line {number} is not an output row with an 'id'; "
                                     f"is the output path holding some other file?") from None

    def done_ids(self) -> set:
        return {row_id for path in self._finished_files() for row_id, _ in self._rows(path)}

    def write_part(self, first_position: int, rows: list[dict]) -> None:
        os.makedirs(self.parts_dir, exist_ok=True)
        path = os.path.join(self.parts_dir, f"part-{first_position:012d}.jsonl")
        write_atomically(path, map(json_line, rows))

    def has_parts(self) -> bool:
        return os.path.isdir(self.parts_dir)

    def merge(self) -> int:
        """Fold the parts into the output file, in input order; returns the number of rows in it."""
        seen = set()

        def unique_lines():
            for path in self._finished_files():
                for row_id, line in self._rows(path):
                    # A merge cut short after its rename leaves parts whose rows are already in the output.
                    if row_id not in seen:
                        seen.add(row_id)
                        yield line

        write_atomically(self.output, unique_lines())
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return len(seen)


class ErrorLog:
    """Rows that could not run, one JSON object per line: position, id and why. Rewritten by every run
    (each run re-reads the whole input), and replaced only when the run ends, so it is always complete."""

    def __init__(self, path: str, position: str):
        self.path, self.position = path, position
        self.count = 0
        self._file = open(path + ".tmp", "w", encoding="utf-8")

    def add(self, error: RowError) -> None:
        self._file.write(json_line({self.position: error.line, "id": error.id, "error": error.message}))
        self.count += 1

    def commit(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.path + ".tmp", self.path)

    def discard(self) -> None:
        self._file.close()
        os.remove(self.path + ".tmp")
