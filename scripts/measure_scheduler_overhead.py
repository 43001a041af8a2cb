"""Host cost of one engine step without the model: schedule + input preparation (InputBuilder and
DecodeInputs, CPU tensors) + postprocess, at 64, 256 and 1024 running sequences, and whether host memory grows step
after step.

The workload keeps the batch full: each request has a 128-token prompt and 32-96 output tokens, and
every request that finishes is replaced by a new one, so steps are a steady mix of decode steps (all
running sequences) and small prefill steps (the newcomers). A fake model samples random non-eos tokens.
The cost per running sequence should stay flat as the batch grows (no per-step quadratic work);
memory is traced (tracemalloc) in a second pass, as tracing slows Python down.

    PYTHONPATH=. python scripts/measure_scheduler_overhead.py [--steps 400]
"""
import argparse
import random
import statistics
import time
import tracemalloc

import torch

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.decode_inputs import DecodeInputs
from nanovllm.engine.input_batch import InputBuilder
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

BATCH_SIZES = (64, 256, 1024)
BLOCK_SIZE, PROMPT_LEN, MIN_OUT, MAX_OUT, VOCAB, EOS = 16, 128, 32, 96, 32000, 0
# Timing settles once the mix of sequence ages (hence lengths) does: about two request lifetimes.
TIME_WARMUP_STEPS = 200
# The heap rises until the first requests' KV blocks have all been recycled: a freed block keeps its
# token ids (for prefix hits), at first shared with live sequences, later the only reference to them.
MEMORY_WARMUP_STEPS = 600


class Workload:
    def __init__(self, num_seqs: int, seed: int = 0):
        self.rng = random.Random(seed)
        blocks_per_seq = -(-(PROMPT_LEN + MAX_OUT) // BLOCK_SIZE)
        self.scheduler = Scheduler(num_seqs, max(8192, num_seqs), BlockManager(num_seqs * blocks_per_seq, BLOCK_SIZE),
                                   (EOS,), PROMPT_LEN + MAX_OUT + 1)
        self.inputs = InputBuilder(BLOCK_SIZE, torch.device("cpu"))
        self.decode_inputs = DecodeInputs(num_seqs, blocks_per_seq, BLOCK_SIZE, torch.device("cpu"))
        self.add(num_seqs)

    def add(self, count: int) -> None:
        for _ in range(count):
            prompt = [self.rng.randrange(1, VOCAB) for _ in range(PROMPT_LEN)]
            params = SamplingParams(temperature=0, max_tokens=self.rng.randint(MIN_OUT, MAX_OUT))
            self.scheduler.add(Sequence(prompt, params, BLOCK_SIZE))

    def live_tokens(self) -> int:
        return sum(len(seq) for seq in (*self.scheduler.running, *self.scheduler.waiting))

    def step(self, times: dict[str, list[float]] | None = None) -> None:
        t0 = time.perf_counter()
        seqs, is_prefill = self.scheduler.schedule()
        t1 = time.perf_counter()
        batch = self.inputs.prefill(seqs) if is_prefill else self.decode_inputs.prepare(seqs, len(seqs))
        t2 = time.perf_counter()
        tokens = [self.rng.randrange(1, VOCAB) if sampled else None for sampled in batch.sampled]
        if not is_prefill:
            self.decode_inputs.sampled = torch.tensor(tokens)
        t3 = time.perf_counter()
        finished = self.scheduler.postprocess(seqs, tokens)
        t4 = time.perf_counter()
        self.add(len(finished))
        if times is not None:
            kind = "prefill" if is_prefill else "decode"
            times[f"{kind} schedule"].append(t1 - t0)
            times[f"{kind} inputs"].append(t2 - t1)
            times[f"{kind} postprocess"].append(t4 - t3)
            times[f"{kind} step"].append((t4 - t0) - (t3 - t2))  # less the fake model


def measure_time(num_seqs: int, steps: int) -> dict[str, float]:
    work = Workload(num_seqs)
    for _ in range(TIME_WARMUP_STEPS):
        work.step()
    times = {f"{kind} {part}": [] for kind in ("decode", "prefill")
             for part in ("schedule", "inputs", "postprocess", "step")}
    for _ in range(steps):
        work.step(times)
    return {name: statistics.median(values) * 1e6 if values else float("nan") for name, values in times.items()}


def measure_memory(num_seqs: int, steps: int) -> tuple[tuple[float, float], tuple[int, int]]:
    """Traced Python heap (bytes) and live tokens (all queued sequences) after warm-up and after
    `steps` more steps: with no leak the heap follows the live tokens, which only fluctuate."""
    work = Workload(num_seqs)
    tracemalloc.start()
    for _ in range(MEMORY_WARMUP_STEPS):
        work.step()
    heap, tokens = [tracemalloc.get_traced_memory()[0]], [work.live_tokens()]
    for _ in range(steps):
        work.step()
    heap.append(tracemalloc.get_traced_memory()[0])
    tokens.append(work.live_tokens())
    tracemalloc.stop()
    return tuple(heap), tuple(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="measured steps per batch size")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{args.steps} steps after {TIME_WARMUP_STEPS} (timing) or {MEMORY_WARMUP_STEPS} (memory) warm-up steps; "
          f"times are medians per step in microseconds")
    print(f"{'running':>8} {'decode step':>12} {'per seq':>8} {'schedule':>9} {'inputs':>8} {'postproc':>9} "
          f"{'prefill step':>13} {'heap MiB before -> after':>25} {'live tokens before -> after':>28}")
    for num_seqs in BATCH_SIZES:
        t = measure_time(num_seqs, args.steps)
        (heap0, heap1), (tokens0, tokens1) = measure_memory(num_seqs, args.steps)
        print(f"{num_seqs:>8} {t['decode step']:>12.0f} {t['decode step'] / num_seqs:>8.2f} "
              f"{t['decode schedule']:>9.0f} {t['decode inputs']:>8.0f} {t['decode postprocess']:>9.0f} "
              f"{t['prefill step']:>13.0f} {heap0 / 2**20:>16.2f} -> {heap1 / 2**20:<5.2f} "
              f"{tokens0:>19} -> {tokens1:<6}")


if __name__ == "__main__":
    main()
