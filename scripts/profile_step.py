"""Where a decode step's time goes at a given batch size, on random Qwen3-0.6B weights: the host's
work (schedule, queue the step on the device, postprocess) against the time it waits for the
device's tokens. With asynchronous scheduling the next step is queued before that wait, so the
device idles only when the host work exceeds the device's step.

    python scripts/profile_step.py [--num-seqs 256] [--prompt-len 512] [--steps 100]
"""
import argparse
import statistics
import tempfile
import time


from nanovllm import LLM, SamplingParams
from nanovllm.engine.model_runner import StepOutput
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
    p.add_argument("--sync", action="store_true", help="async_scheduling=False: each step waits for its tokens")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(make_benchmark_model(tmp, args.shape), async_scheduling=not args.sync)
    times = {name: [] for name in ("schedule", "prepare", "launch", "wait", "postprocess", "step")}
    timed(llm.scheduler, "schedule", times["schedule"])
    timed(llm.scheduler, "look_ahead", times["schedule"])
    timed(llm.model_runner.decode_inputs, "prepare", times["prepare"])
    timed(llm.model_runner, "run", times["launch"])
    timed(StepOutput, "read", times["wait"])
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
    host = median["step"] - median["wait"]
    print(f"decode step at {args.num_seqs} sequences, context ~{args.prompt_len}, async_scheduling="
          f"{llm.async_scheduling} (median of {args.steps} steps, ms; prepare is part of launch)")
    for name in times:
        print(f"{name:>12}: {median[name]:8.3f}")
    print(f"{'host work':>12}: {host:8.3f}  ({host / median['step']:.1%} of the step; the rest waits for the device)")

if __name__ == "__main__":
    main()
