"""The `nanovllm` command.

    nanovllm batch --model ~/huggingface/Qwen3-0.6B --input prompts.jsonl --output results.jsonl
"""
import argparse
import json
import logging
import sys
from dataclasses import MISSING, fields

from nanovllm.batch import BatchJob, run_batch
from nanovllm.config import Config
from nanovllm.sampling_params import SamplingParams

JOB_FLAGS = ("model", "input", "output", "errors", "chunk_size", "data_parallel_size", "ray", "progress")


def json_or_text(value: str):
    """For options without a simple default type (lists, None): JSON if it parses, else the text itself."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def add_field_options(group, dataclass, names, prefix: str, taken: set) -> None:
    """One flag per dataclass field, typed from its default, so the CLI follows the dataclass as it grows.
    Defaults stay None: only options given on the command line are passed on."""
    for f in fields(dataclass):
        if f.name not in names:
            continue
        # Engine and sampling fields share one namespace of flags; a sampling field whose name is taken
        # gets a "sampling-" prefix rather than breaking the parser.
        name = f.name if f.name not in taken else f"sampling_{f.name}"
        taken.add(name)
        flag, default = "--" + name.replace("_", "-"), f.default
        dest = f"{prefix}{f.name}"
        if isinstance(default, bool):
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, help=f"default {default}")
        elif isinstance(default, (int, float, str)):
            group.add_argument(flag, dest=dest, type=type(default), metavar=type(default).__name__.upper(),
                               help=f"default {default!r}")
        else:
            shown = "" if default is MISSING else f"default {default!r}; "
            group.add_argument(flag, dest=dest, type=json_or_text, metavar="JSON", help=f"{shown}JSON or text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanovllm", description="nano-vllm: offline LLM inference.")
    commands = parser.add_subparsers(dest="command", required=True)
    batch = commands.add_parser(
        "batch", help="run every row of a JSONL or Parquet file through a model",
        description="Run every row of a JSONL or Parquet file through a model; write JSON lines. A row has an "
                    "'id', one of 'prompt', 'prompt_token_ids' or 'messages', and optional sampling fields. "
                    "Rerunning the same command after a crash resumes where it stopped.")
    batch.add_argument("--model", required=True, help="a local checkpoint directory")
    batch.add_argument("--input", required=True, help="rows to run (.jsonl or .parquet)")
    batch.add_argument("--output", required=True, help="results, one JSON object per line")
    batch.add_argument("--errors", metavar="PATH",
                       help="record rows that cannot run here and go on; without it the job stops at the first")
    batch.add_argument("--chunk-size", type=int, default=BatchJob.chunk_size,
                       help="rows per engine call and per output part file (default %(default)s)")
    batch.add_argument("--data-parallel-size", type=int, default=1,
                       help="engines over shards of the input, each on tensor-parallel-size GPUs (or Ray actors)")
    batch.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                       help="run on Ray: alone, the cluster in RAY_ADDRESS or started here with `ray start`, else "
                            "a local one; or an address such as ray://head:10001")
    batch.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    taken = set(JOB_FLAGS)
    add_field_options(batch.add_argument_group("engine options (LLM)"), Config, Config.field_names(),
                      "engine.", taken)
    sampling = {f.name for f in fields(SamplingParams) if f.init}
    add_field_options(batch.add_argument_group("sampling, for rows that don't set their own"), SamplingParams,
                      sampling, "sampling.", taken)
    return parser


def given(args: argparse.Namespace, prefix: str) -> dict:
    return {key.removeprefix(prefix): value for key, value in vars(args).items()
            if key.startswith(prefix) and value is not None}


def run_batch_command(args: argparse.Namespace) -> int:
    try:
        job = BatchJob(model=args.model, input=args.input, output=args.output, errors=args.errors,
                       chunk_size=args.chunk_size, data_parallel_size=args.data_parallel_size,
                       ray=args.ray is not None, ray_address=args.ray or None,
                       engine=given(args, "engine."), sampling=given(args, "sampling."), progress=args.progress)
        summary = run_batch(job)
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        print(f"nanovllm batch: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nanovllm batch: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    rate = summary.completion_tokens / summary.generation_seconds if summary.generation_seconds else 0.0
    print(f"{summary.rows_written} rows written to {summary.output} ({summary.rows_already_done} were already "
          f"there, {summary.rows_failed} could not run); {summary.completion_tokens} completion tokens in "
          f"{summary.generation_seconds:.1f} s ({rate:.0f} tok/s) after {summary.startup_seconds:.1f} s start-up")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_batch_command(args)


if __name__ == "__main__":
    sys.exit(main())
