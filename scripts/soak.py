"""Soak test: one engine runs bench.py's workload (greedy) again and again for a fixed time; every
repetition must give the same tokens as the first, and neither GPU nor host memory may grow.

    python scripts/soak.py --minutes 10                 # random Qwen3-0.6B weights, 256 requests
    python scripts/soak.py --minutes 1 --num-seqs 32    # a quick look

Prints one line per repetition (seconds, tok/s, GPU memory allocated / reserved, host RSS), then a
verdict. Memory is compared from the end of the first repetition, once every cache and pool exists.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

from bench import workload
from nanovllm import LLM, SamplingParams
from nanovllm.testing.checkpoints import make_random_checkpoint
from nanovllm.testing.tokenizer import train_tokenizer

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
        make_random_checkpoint(tmp, args.shape, dtype=torch.bfloat16 if on_cuda else torch.float32,
                               device="cuda" if on_cuda else "cpu", std=0.02)
        train_tokenizer(tmp)
        llm = LLM(tmp)
        prompts, output_lens = workload(args, llm.config.hf_config.vocab_size)
        params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=n) for n in output_lens]
        first_tokens, baseline, mismatches, rows = None, None, 0, []
        deadline = time.perf_counter() + args.minutes * 60
        print(f"{'rep':>4} {'seconds':>8} {'tok/s':>8} {'GPU alloc MiB':>14} {'GPU reserved MiB':>17} "
              f"{'host RSS MiB':>13} {'same tokens':>12}", flush=True)
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            tokens = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
            seconds = time.perf_counter() - start
            allocated, reserved = gpu_memory()
            rss = host_rss()
            first_tokens = first_tokens or tokens
            same = tokens == first_tokens
            mismatches += not same
            baseline = baseline or (allocated, reserved, rss)
            rows.append((allocated, reserved, rss))
            print(f"{len(rows):>4} {seconds:>8.2f} {sum(map(len, tokens)) / seconds:>8.0f} {allocated / MIB:>14.1f} "
                  f"{reserved / MIB:>17.1f} {rss / MIB:>13.1f} {str(same):>12}", flush=True)
        llm.exit()
    growth = [max(r[i] for r in rows) - baseline[i] for i in range(3)]
    device = torch.cuda.get_device_name() if on_cuda else "cpu"
    print(f"device: {device}; {len(rows)} repetitions in {args.minutes:g} minutes; tokens differing from the "
          f"first repetition: {mismatches}; growth over the first repetition: GPU allocated "
          f"{growth[0] / MIB:.1f} MiB, reserved {growth[1] / MIB:.1f} MiB, host RSS {growth[2] / MIB:.1f} MiB")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
