"""Data-parallel speed-up of the batch job: bench.py's workload scaled to 512 requests, run as a batch job
with N engine processes (one GPU each), then with one engine in this process.

    PYTHONPATH=. python scripts/bench_data_parallel.py                       # 512 requests, 2 GPUs vs 1
    PYTHONPATH=. python scripts/bench_data_parallel.py --num-seqs 64 --max-output-len 128   # a quick look

Time counts from all engines ready to the last row written: start-up (weights, CUDA graphs) runs in
parallel across engines and is printed apart. An untimed warm-up job runs first, so that both timed
runs find the on-disk kernel caches filled. One engine gets the whole workload as one chunk, its best
case; N engines get chunks of num_seqs / N, one each. The N-engine run goes first, while this process has
not touched CUDA, so every engine sees a whole free GPU.
"""
import argparse
import json
import logging
import os
import tempfile
from random import randint, seed

import torch
from transformers import AutoConfig

from nanovllm.batch import BatchJob, run_batch
from nanovllm.testing.checkpoints import SHAPES, make_random_checkpoint
from nanovllm.testing.tokenizer import train_tokenizer


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a local checkpoint directory")
    src.add_argument("--random-weights", choices=SHAPES, default="qwen3-0.6b")
    p.add_argument("--num-seqs", type=int, default=512)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--data-parallel-size", type=int, default=2)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--enforce-eager", action="store_true")
    return p.parse_args()


def write_workload(path: str, num_seqs: int, max_input_len: int, max_output_len: int, vocab_size: int) -> None:
    """bench.py's recipe: seed 0, prompt ids randint(0, 10000), prompt and output lengths randint(100, max)."""
    seed(0)
    max_id = min(10000, vocab_size - 1)
    prompts = [[randint(0, max_id) for _ in range(randint(min(100, max_input_len), max_input_len))]
               for _ in range(num_seqs)]
    output_lens = [randint(min(100, max_output_len), max_output_len) for _ in range(num_seqs)]
    with open(path, "w") as f:
        for i, (prompt, max_tokens) in enumerate(zip(prompts, output_lens)):
            f.write(json.dumps({"id": i, "prompt_token_ids": prompt, "max_tokens": max_tokens}) + "\n")


def run(model: str, workload: str, tmp: str, args, num_engines: int, num_seqs: int):
    job = BatchJob(model, workload, os.path.join(tmp, f"out-{os.path.basename(workload)}-{num_engines}.jsonl"),
                   chunk_size=-(-num_seqs // num_engines), data_parallel_size=num_engines,
                   engine=dict(tensor_parallel_size=args.tensor_parallel_size, enforce_eager=args.enforce_eager),
                   sampling=dict(temperature=args.temperature, ignore_eos=True), progress=False)
    return run_batch(job)


def main():
    args = parse_args()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("nanovllm").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            # Built on the CPU, so this process holds no CUDA memory while the engines measure theirs.
            model = make_random_checkpoint(os.path.join(tmp, "model"), args.random_weights, dtype=torch.bfloat16,
                                           std=0.02)
            train_tokenizer(model)
        vocab_size = AutoConfig.from_pretrained(model).vocab_size
        workload, warm_up = os.path.join(tmp, "workload.jsonl"), os.path.join(tmp, "warm-up.jsonl")
        write_workload(workload, args.num_seqs, args.max_input_len, args.max_output_len, vocab_size)
        write_workload(warm_up, 16 * args.data_parallel_size, args.max_input_len, min(100, args.max_output_len),
                       vocab_size)
        # Untimed: fills the on-disk kernel caches (Triton, inductor), which a process's first engine
        # otherwise fills inside its first timed requests, so neither timed run below pays for them.
        run(model, warm_up, tmp, args, args.data_parallel_size, 16 * args.data_parallel_size)
        parallel = run(model, workload, tmp, args, args.data_parallel_size, args.num_seqs)
        single = run(model, workload, tmp, args, 1, args.num_seqs)
    print(f"{'engines':>8} {'requests':>9} {'output tokens':>14} {'start-up s':>11} {'seconds':>8} {'tok/s':>8}")
    for engines, summary in ((1, single), (args.data_parallel_size, parallel)):
        print(f"{engines:>8} {summary.rows_written:>9} {summary.completion_tokens:>14} "
              f"{summary.startup_seconds:>11.1f} {summary.generation_seconds:>8.2f} "
              f"{summary.completion_tokens / summary.generation_seconds:>8.0f}")
    speedup = single.generation_seconds / parallel.generation_seconds
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; "
          f"speed-up with {args.data_parallel_size} engines: {speedup:.2f}x (target >= 1.8x on 2 GPUs)")


if __name__ == "__main__":
    main()
