"""The sampler alone at a decode batch: milliseconds per call (wall, synchronized) for plain temperature
and for top_p 0.9 + top_k 50 + repetition_penalty 1.1, both when the step's settings carry over from
the last step (the same sequences) and when they are rebuilt (one sequence finished since the last
call), over Qwen3's vocabulary.

    python scripts/profile_sampler.py [--batch 256] [--vocab 151936] [--history 1024]
"""
import argparse
import time

import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.sampling import Sampler
from nanovllm.sampling_params import SamplingParams

SETTINGS = {"plain": dict(temperature=0.6),
            "filters": dict(temperature=0.6, top_p=0.9, top_k=50, repetition_penalty=1.1)}


def time_calls(sampler, logits, seqs: list[Sequence], calls: int, one_finishes: bool, device) -> float:
    """ms per sampler call; one_finishes: the first sequence leaves the batch after each call."""
    for _ in range(3):
        sampler(logits[:len(seqs)].clone(), seqs, (2,))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    total = 0.0
    for _ in range(calls):
        batch_logits = logits[:len(seqs)].clone()
        sync()
        start = time.perf_counter()
        output = sampler(batch_logits, seqs, (2,))
        sync()
        total += time.perf_counter() - start
        for seq, token in zip(seqs, output.token_ids):
            seq.append_token(token)
        seqs = seqs[1:] if one_finishes else seqs
    return total * 1e3 / calls


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--history", type=int, default=1024, help="prompt tokens per sequence")
    p.add_argument("--calls", type=int, default=50)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    logits = torch.randn(args.batch, args.vocab, device=device, dtype=torch.bfloat16) * 3
    print(f"{'settings':>8} {'carried over ms':>16} {'rebuilt ms':>11}   (batch {args.batch}, vocab {args.vocab}, {device})")
    for name, settings in SETTINGS.items():
        params = SamplingParams(ignore_eos=True, max_tokens=10_000, **settings)
        times = []
        for one_finishes in (False, True):
            seqs = [Sequence([(7 * i + j) % args.vocab for j in range(args.history)], params, 256)
                    for i in range(args.batch)]
            times.append(time_calls(Sampler(), logits, seqs, args.calls, one_finishes, device))
        print(f"{name:>8} {times[0]:>16.3f} {times[1]:>11.3f}")


if __name__ == "__main__":
    main()
