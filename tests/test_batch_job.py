"""Batch jobs as a user runs them: `nanovllm batch` over a file of rows, resumed after a crash, with bad
rows, over several engine processes, from Parquet."""
import json
import os
import subprocess
import sys

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.batch import BatchJob, run_batch
from nanovllm.batch.worker import CRASH_ENV
from nanovllm.cli import main
from tests.conftest import CPU_ENGINE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_FLAGS = [arg for key, value in CPU_ENGINE.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
CHUNK_SIZE = 3
# Every prompt form, per-row sampling fields over the job's defaults (greedy, 3 tokens).
ROWS = [
    {"id": "text-0", "prompt": "Hello, Nano-vLLM."},
    {"id": "ids-1", "prompt_token_ids": [10, 11, 12, 13]},
    {"id": "chat-2", "messages": [{"role": "user", "content": "Introduce yourself."}]},
    {"id": 3, "prompt": "The quick brown fox", "max_tokens": 5},
    {"id": "text-4", "prompt": "Paged attention stores keys", "ignore_eos": True},
    {"id": "ids-5", "prompt_token_ids": [40, 41, 42], "max_tokens": 2, "temperature": 0.0},
    {"id": "text-6", "prompt": "Once upon a time"},
    {"id": "chat-7", "messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "def add(a, b):"}]},
    {"id": "text-8", "prompt": "Un café, s'il vous plaît."},
    {"id": "ids-9", "prompt_token_ids": [7] * 20, "max_tokens": 4},
]
DEFAULT_SAMPLING = {"temperature": 0.0, "max_tokens": 3}


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines(row if isinstance(row, str) else json.dumps(row) + "\n" for row in rows)
    return str(path)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def batch_args(model, input_path, output_path, *extra) -> list[str]:
    return ["batch", "--model", model, "--input", str(input_path), "--output", str(output_path),
            "--chunk-size", str(CHUNK_SIZE), "--temperature", "0", "--max-tokens", "3", "--no-progress",
            *ENGINE_FLAGS, *extra]


def run_job(model, tmp_path, rows=ROWS, *extra, name="out") -> list[dict]:
    output = tmp_path / f"{name}.jsonl"
    assert main(batch_args(model, write_jsonl(tmp_path / f"{name}-in.jsonl", rows), output, *extra)) == 0
    return read_jsonl(output)


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> list[dict]:
    """One engine in this process, uninterrupted: what every other way of running the job must equal."""
    return run_job(tiny_model, tmp_path_factory.mktemp("reference"))


def test_output_rows_are_what_generate_returns(tiny_model, reference):
    llm = LLM(tiny_model, **CPU_ENGINE)
    assert [row["id"] for row in reference] == [row["id"] for row in ROWS]  # input order
    for row, out in zip(ROWS, reference):
        sampling = SamplingParams(**DEFAULT_SAMPLING | {k: v for k, v in row.items()
                                                        if k in ("max_tokens", "temperature", "ignore_eos")})
        if "messages" in row:
            [expected] = llm.chat(row["messages"], sampling, use_tqdm=False)
        else:
            [expected] = llm.generate([row.get("prompt") or row["prompt_token_ids"]], sampling, use_tqdm=False)
        assert out["text"] == expected["text"] and out["token_ids"] == expected["token_ids"]
        assert out["finish_reason"] == expected["finish_reason"]
        assert out["num_prompt_tokens"] == len(expected["prompt_token_ids"])
        assert out["num_completion_tokens"] == len(expected["token_ids"])
        assert "num_cached_tokens" in out


@pytest.mark.parametrize("engines", [1, 2])
def test_resume_after_crash_writes_every_id_once(tiny_model, tmp_path, reference, engines):
    input_path, output = write_jsonl(tmp_path / "in.jsonl", ROWS), tmp_path / "out.jsonl"
    crash_line = 2 * CHUNK_SIZE + 1  # the engine that runs the third chunk dies before handing it back
    env = os.environ | {CRASH_ENV: f"{crash_line}:{tmp_path / 'crashed'}"}
    command = [sys.executable, "-m", "nanovllm.cli", *batch_args(tiny_model, input_path, output),
               "--data-parallel-size", str(engines)]
    crashed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert crashed.returncode != 0 and not output.exists(), crashed.stderr
    parts_dir = tmp_path / "out.jsonl.parts"
    parts = sorted(os.listdir(parts_dir)) if parts_dir.exists() else []
    if engines == 1:  # the two chunks before the crash, nothing after
        assert parts == ["part-000000000001.jsonl", "part-000000000004.jsonl"]
    else:  # the driver outlives its engine and says what to do
        assert "Rerun the same job to resume" in crashed.stderr
    done_before = sum(len(read_jsonl(parts_dir / part)) for part in parts)
    # What a crash in the middle of writing a part leaves: a temporary file, never counted as done.
    parts_dir.mkdir(exist_ok=True)
    (parts_dir / "part-000000000007.jsonl.tmp").write_text('{"id": "text-6", "te')

    summary = run_batch(BatchJob(tiny_model, input_path, str(output), chunk_size=CHUNK_SIZE, engine=CPU_ENGINE,
                                 sampling=DEFAULT_SAMPLING, progress=False))
    assert (summary.rows_already_done, summary.rows_written) == (done_before, len(ROWS) - done_before)
    assert read_jsonl(output) == reference  # every id once, in input order
    assert not parts_dir.exists()


def test_rerunning_a_finished_job_changes_nothing(tiny_model, tmp_path, reference):
    first = run_job(tiny_model, tmp_path)
    input_path, output = tmp_path / "out-in.jsonl", tmp_path / "out.jsonl"
    summary = run_batch(BatchJob(tiny_model, str(input_path), str(output), engine=CPU_ENGINE, progress=False))
    assert (summary.rows_written, summary.rows_already_done) == (0, len(ROWS))
    assert read_jsonl(output) == first == reference


# (bad row, what the message says). Each replaces the row on line BAD_LINE.
BAD_ROWS = [
    ('{"id": "x", "prompt": "unterminated\n', "not valid JSON"),
    ({"prompt": "no id"}, "missing 'id'"),
    ({"id": "text-0", "prompt": "again"}, "duplicate id 'text-0', first used on line 1"),
    ({"id": "two", "prompt": "two forms", "prompt_token_ids": [1]}, "exactly one of"),
    ({"id": "hot", "prompt": "hot", "temperature": -1}, "temperature must be in"),
    ({"id": "chat", "messages": [{"role": "user"}]}, "messages[0]['content'] must be a str"),
    ({"id": "typo", "prompt": "typo", "max_token": 3}, "unknown field(s) ['max_token']"),
    ({"id": "vocab", "prompt_token_ids": [5, 100000]}, "outside the vocabulary"),  # found by the engine
    ({"id": "long", "prompt_token_ids": [5] * 600}, "max_model_len"),  # found by the engine
]
BAD_LINE = 5


@pytest.mark.parametrize("bad_row, message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_bad_row_stops_the_job_with_its_line(tiny_model, tmp_path, capsys, bad_row, message):
    rows = ROWS[:BAD_LINE - 1] + [bad_row] + ROWS[BAD_LINE:]
    output = tmp_path / "out.jsonl"
    assert main(batch_args(tiny_model, write_jsonl(tmp_path / "in.jsonl", rows), output)) == 1
    error = capsys.readouterr().err
    assert f"line {BAD_LINE}: " in error and message in error
    assert not output.exists()


def test_bad_rows_go_to_the_errors_file_and_the_rest_runs(tiny_model, tmp_path, reference):
    rows = [row for pair in zip(ROWS, BAD_ROWS) for row in (pair[0], pair[1][0])] + ROWS[len(BAD_ROWS):]
    errors = tmp_path / "errors.jsonl"
    out = run_job(tiny_model, tmp_path, rows, "--errors", str(errors))
    assert out == reference
    recorded = read_jsonl(errors)
    assert [e["line"] for e in recorded] == [2 * (i + 1) for i in range(len(BAD_ROWS))]  # every bad row, in order
    for entry, (_, message) in zip(recorded, BAD_ROWS):
        assert message in entry["error"]


def test_data_parallel_engines_equal_one_engine(tiny_model, tmp_path, reference):
    assert run_job(tiny_model, tmp_path, ROWS, "--data-parallel-size", "2") == reference


def test_parquet_input_equals_jsonl(tiny_model, tmp_path, reference):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    columns = {key: [row.get(key) for row in ROWS] for key in dict.fromkeys(k for row in ROWS for k in row)}
    columns["id"] = [str(i) for i in columns["id"]]  # a Parquet column holds one type
    pq.write_table(pa.table(columns), tmp_path / "in.parquet")
    output = tmp_path / "out.jsonl"
    assert main(batch_args(tiny_model, tmp_path / "in.parquet", output)) == 0
    assert [{**row, "id": str(row["id"])} for row in reference] == read_jsonl(output)


@pytest.mark.parametrize("change, error, message", [
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(data_parallel_size=0), ValueError, "data_parallel_size"),
    (dict(engine={"max_num_seq": 4}), TypeError, "max_num_seq"),
    (dict(sampling={"temperature": -1.0}), ValueError, "temperature"),
    (dict(output="SAME"), ValueError, "must be different files"),
    (dict(ray_address="ray://head:10001"), ValueError, "ray=True"),
])
def test_job_settings_are_checked_before_any_work(tiny_model, tmp_path, change, error, message):
    input_path = write_jsonl(tmp_path / "in.jsonl", ROWS)
    settings = dict(model=tiny_model, input=input_path, output=str(tmp_path / "out.jsonl")) | change
    if settings["output"] == "SAME":
        settings["output"] = input_path
    with pytest.raises(error, match=message):
        BatchJob(**settings)
