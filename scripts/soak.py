"""Soak test: one engine runs bench.py's workload again and again for a fixed time, in rounds of three
repetitions: greedy, plain temperature 0.6, and temperature 0.6 with top_p 0.9, top_k 50 and
repetition_penalty 1.1. Every greedy repetition must give the same tokens as the first, and neither GPU
nor host memory may grow. The sampled repetitions also give the filters' throughput against plain
temperature's, measured many times in one process (medians printed last).

    python scripts/soak.py --minutes 10                 # random Qwen3-0.6B weights, 256 requests
    python scripts/soak.py --minutes 1 --num-seqs 32    # a quick look

Prints one line per repetition (kind, seconds, tok/s, GPU memory allocated / reserved, host RSS), then a
verdict. Memory is compared from the end of the first round, once every cache and pool exists. On the
CPU, host RSS also grows while the KV cache (allocated untouched) is written for the first time.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from bench import workload
from nanovllm import LLM, SamplingParams
from nanovllm.testing.checkpoints import make_benchmark_model

MIB = 2**20


def host_rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def gpu_memory() -> tuple[int, int]:
    if not torch.cuda.is_available():
        return 0, 0
    return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--shape", default="qwen3-0.6b")
    args = p.parse_args()
    args.input_len = args.output_len = None
    on_cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(make_benchmark_model(tmp, args.shape))
        prompts, output_lens = workload(args, llm.config.hf_config.vocab_size)
        kinds = {"greedy": dict(temperature=0), "plain": dict(temperature=0.6),
                 "filters": dict(temperature=0.6, top_p=0.9, top_k=50, repetition_penalty=1.1)}
        params = {kind: [SamplingParams(ignore_eos=True, max_tokens=n, **settings) for n in output_lens]
                  for kind, settings in kinds.items()}
        first_greedy, baseline, mismatches, memory = None, None, 0, []
        throughput = {kind: [] for kind in kinds}
        deadline = time.perf_counter() + args.minutes * 60
        print(f"{'rep':>4} {'kind':>8} {'seconds':>8} {'tok/s':>8} {'GPU alloc MiB':>14} {'GPU reserved MiB':>17} "
              f"{'host RSS MiB':>13} {'same tokens':>12}", flush=True)
        while time.perf_counter() < deadline:
            for kind in kinds:
                start = time.perf_counter()
                tokens = [o["token_ids"] for o in llm.generate(prompts, params[kind], use_tqdm=False)]
                seconds = time.perf_counter() - start
                throughput[kind].append(sum(map(len, tokens)) / seconds)
                same = ""
                if kind == "greedy":
                    first_greedy = first_greedy or tokens
                    same = tokens == first_greedy
                    mismatches += not same
                memory.append((*gpu_memory(), host_rss()))
                print(f"{len(memory):>4} {kind:>8} {seconds:>8.2f} {throughput[kind][-1]:>8.0f} "
                      f"{memory[-1][0] / MIB:>14.1f} {memory[-1][1] / MIB:>17.1f} {memory[-1][2] / MIB:>13.1f} "
                      f"{str(same):>12}", flush=True)
            baseline = baseline or memory[-1]
        llm.exit()
    growth = [max(m[i] for m in memory[len(kinds):]) - baseline[i] for i in range(3)] if len(memory) > 3 else [0] * 3
    medians = {kind: statistics.median(values) for kind, values in throughput.items()}
    device = torch.cuda.get_device_name() if on_cuda else "cpu"
    print(f"device: {device}; {len(memory)} repetitions in {args.minutes:g} minutes; greedy repetitions whose tokens "
          f"differ from the first: {mismatches} of {len(throughput['greedy'])}; growth after the first round: GPU "
          f"allocated {growth[0] / MIB:.1f} MiB, reserved {growth[1] / MIB:.1f} MiB, host RSS {growth[2] / MIB:.1f} MiB")
    print(f"median output tok/s: greedy {medians['greedy']:.0f}, plain {medians['plain']:.0f}, filters "
          f"{medians['filters']:.0f} = {medians['filters'] / medians['plain']:.1%} of plain")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
