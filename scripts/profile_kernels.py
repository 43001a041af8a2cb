"""GPU kernel time per decode step (torch profiler) at a few batch sizes, on random Qwen3 weights.
With tensor parallelism it profiles rank 0's GPU, whose collectives (NCCL kernels) show among its kernels.
It also prints how long the GPU ran no kernel at all per step, and between which kernels those gaps fell
(a collective that waits for a slower rank counts as running, not as a gap), and how long rank 0's host
was busy per step (not waiting for tokens): a host busy for a whole step is what the GPU waits for.

    python scripts/profile_kernels.py [--batch-sizes 1 64 256] [--context 512] [--shape qwen3-8b | --model DIR]
        [--tensor-parallel-size 2] [--trace DIR]

--trace writes each batch size's profile as a gzipped Chrome trace (chrome://tracing, Perfetto): it shows
when rank 0's host launched each kernel, which tells a host that fell behind from a device that waits.
"""
import argparse
import gzip
import os
import shutil
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from nanovllm import LLM, SamplingParams
from nanovllm.engine.model_runner import StepOutput
from nanovllm.testing.checkpoints import make_benchmark_model


def gaps_between(kernels: list[tuple[float, float, object]]):
    """kernels: (start, end, what) of every kernel on the GPU (they may overlap) -> yields each stretch
    when none ran: (its start, its length, the `what` that ended last before it, the one after it)."""
    kernels = sorted(kernels, key=lambda kernel: kernel[:2])
    busy_until, last = kernels[0][1], kernels[0][2]
    for start, end, what in kernels[1:]:
        if start > busy_until:
            yield busy_until, start - busy_until, last, what
        if end > busy_until:
            busy_until, last = end, what


def idle_gaps(kernels: list[tuple[float, float, str]]) -> dict[tuple[str, str], list[float]]:
    """kernels: (start, end, name) -> the lengths of the stretches when none ran, grouped by the names
    of the kernels around them."""
    gaps: dict[tuple[str, str], list[float]] = {}
    for _, length, before, after in gaps_between(kernels):
        gaps.setdefault((before, after), []).append(length)
    return gaps


def is_kernel(device_type, name: str) -> bool:
    """Whether a profiler event is GPU work: the profiler's step annotations show on the GPU too,
    spanning each step's kernels (counted as kernels, they doubled call Z's kernel time)."""
    return device_type == torch.autograd.DeviceType.CUDA and not name.startswith("ProfilerStep")


def save_trace(prof, path: str) -> None:
    with tempfile.NamedTemporaryFile(suffix=".json") as raw:
        prof.export_chrome_trace(raw.name)
        with open(raw.name, "rb") as source, gzip.open(path, "wb") as target:
            shutil.copyfileobj(source, target)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--wall-steps", type=int, default=50, help="steps timed without the profiler")
    p.add_argument("--shape", default="qwen3-0.6b", help="random weights of this shape")
    p.add_argument("--model", help="a checkpoint directory instead of random weights")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--trace", help="a directory for gzipped Chrome traces")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(args.model or make_benchmark_model(tmp, args.shape), tensor_parallel_size=args.tensor_parallel_size)
    params = SamplingParams(temperature=0.6, max_tokens=10_000, ignore_eos=True)
    waited = []  # seconds rank 0's host spent reading steps' tokens (waiting for the GPU)
    read = StepOutput.read

    def timed_read(output):
        started = time.perf_counter()
        try:
            return read(output)
        finally:
            waited.append(time.perf_counter() - started)

    StepOutput.read = timed_read
    for batch in args.batch_sizes:
        prompts = [[(i * 31 + j) % 10000 for j in range(args.context)] for i in range(batch)]
        seqs = llm.make_sequences(prompts, params)
        for seq in seqs:
            llm.scheduler.add(seq)
        while llm.scheduler.waiting:
            llm.step()
        for _ in range(3):
            llm.step()
        torch.cuda.synchronize()
        waited.clear()
        start = time.perf_counter()
        for _ in range(args.wall_steps):
            llm.step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / args.wall_steps
        # Rank 0's host waits for a step's tokens with the next step already queued: a host that waits
        # little per step is what the GPU waits for.
        print(f"\n== batch {batch}: rank 0's host waited for tokens {sum(waited) * 1e3 / args.wall_steps:.3f} "
              f"ms/step, was busy {wall_ms - sum(waited) * 1e3 / args.wall_steps:.3f} ms/step")
        # One warm-up step, profiled and dropped: the profiler's start-up holds up the host there, which
        # shows as gaps before every kernel of that step (0.93 ms at 64 rows of Qwen3-8B, TP=2). The GPU
        # is drained at both edges of the active steps: a step runs after the call that launched it
        # returns, so without that the warm-up's kernels counted among the active ones (39-42 launches
        # per step of a 36-layer model's kernels, call Z in BENCHMARKS.md), and the last step's could
        # end after the profiler stopped.
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU],
                     schedule=schedule(wait=0, warmup=1, active=args.steps, repeat=1)) as prof:
            for step in range(1 + args.steps):
                llm.step()
                if step in (0, args.steps):
                    torch.cuda.synchronize()
                prof.step()
        if args.trace:
            save_trace(prof, os.path.join(args.trace, f"trace_tp{args.tensor_parallel_size}_batch{batch}.json.gz"))
        events = [e for e in prof.key_averages() if is_kernel(e.device_type, e.key)]
        total = sum(e.self_device_time_total for e in events) / args.steps
        launches = sum(e.count for e in events) / args.steps
        print(f"\n== batch {batch}, context {args.context}: wall {wall_ms:.3f} ms/step, GPU kernel time "
              f"{total / 1e3:.3f} ms/step, {launches:.0f} kernels/step")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:args.top]:
            print(f"{e.self_device_time_total / args.steps / 1e3:8.3f} ms {e.count // args.steps:5d}x  {e.key[:90]}")
        kernels = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if is_kernel(e.device_type, e.name)]
        gaps = idle_gaps(kernels)
        print(f"   no kernel running: {sum(map(sum, gaps.values())) / args.steps / 1e3:.3f} ms/step; the longest, "
              f"after -> before:")
        for (after, before), lengths in sorted(gaps.items(), key=lambda item: -sum(item[1]))[:5]:
            print(f"{sum(lengths) / args.steps / 1e3:8.3f} ms {len(lengths) // args.steps:5d}x  "
                  f"{after[:44]} -> {before[:44]}")
        llm.scheduler.abort(seqs)
    llm.exit()


if __name__ == "__main__":
    main()
