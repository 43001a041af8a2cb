"""Where a decode step's time goes at a given batch size: host work (schedule, prepare inputs,
postprocess) against the whole step, on random Qwen3-0.6B weights.

    python scripts/profile_step.py [--num-seqs 256] [--prompt-len 512] [--steps 100]
"""
import argparse
import statistics
import tempfile
import time

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.testing.checkpoints import make_benchmark_model


def timed(obj, name, bucket):
    """Wrap obj.name so each call's wall time is appended to bucket."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = original(*args, **kwargs)
        bucket.append(time.perf_counter() - start)
        return result

    setattr(obj, name, wrapper)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--shape", default="qwen3-0.6b")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(make_benchmark_model(tmp, args.shape))
    times = {name: [] for name in ("schedule", "prepare", "run", "postprocess", "step")}
    timed(llm.scheduler, "schedule", times["schedule"])
    timed(llm.model_runner.decode_inputs, "prepare", times["prepare"])
    timed(llm.model_runner, "run", times["run"])
    timed(llm.scheduler, "postprocess", times["postprocess"])
    timed(llm, "step", times["step"])
    prompts = [[(i * 7 + j) % 10000 for j in range(args.prompt_len)] for i in range(args.num_seqs)]
    params = SamplingParams(temperature=0.6, max_tokens=args.steps + 20, ignore_eos=True)
    for seq in llm.make_sequences(prompts, params):
        llm.scheduler.add(seq)
    while llm.scheduler.waiting:  # prefill everything first
        llm.step()
    for bucket in times.values():
        bucket.clear()
    for _ in range(args.steps):
        llm.step()
    median = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    host = median["schedule"] + median["prepare"] + median["postprocess"]
    print(f"decode step at {args.num_seqs} sequences, context ~{args.prompt_len} (median of {args.steps} steps, ms)")
    for name in ("schedule", "prepare", "run", "postprocess", "step"):
        print(f"{name:>12}: {median[name]:8.3f}")
    print(f"{'host work':>12}: {host:8.3f}  ({host / median['step']:.1%} of the step)")


if __name__ == "__main__":
    main()
