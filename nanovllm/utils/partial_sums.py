"""Running a model written as a generator of partial sums.

A tensor-parallel forward pass stops at the embedding and at each row-parallel projection: there every
rank holds a partial sum that an all-reduce completes, and what follows is always the same: the residual
add, an RMSNorm, and the next column-parallel projection. Qwen3Model.partial_sums is that pass as a
generator: it yields a PartialSum (the partial sum and what follows it) and is sent what follows's
result. The same code then runs two ways:

- run_reducing: one batch, each all-reduce in turn (ParallelGroup.all_reduce: peer memory or NCCL, a
  no-op at one rank). Where the peer all-reduce takes the sum with its add and norm (fits_norm: 16-bit
  rows of 1,024 to 6,144 elements, one width per group, 3 rows or more, up to 4 MB), one kernel does all
  three (PeerAllReduce.all_reduce_norm); otherwise the norm follows the all-reduce, in the GEMV's kernel for
  one or two rows on CUDA (ops.norm_linear). Decode steps, and their CUDA graphs, run this way.
- run_overlapped: a tensor-parallel prefill step split into micro-batches. Each partial sum's all-reduce
  is queued on the collective's own stream (NCCL; gloo: its own thread), and the next micro-batch
  computes meanwhile; a micro-batch waits for its sum only when it resumes. A 16K-token prefill step of
  Qwen3-8B at TP=2 runs 73 NCCL all-reduces of 128 MB, an estimated 0.5 ms each on 2 x H200 (NCCL's
  270 GB/s at 64 MiB), some 15% of the step; overlapped, the benchmark's prefill went from 2.11 to
  2.00 s (BENCHMARKS.md).
"""
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nanovllm.utils.context import AttentionMetadata, set_context
from nanovllm.utils.distributed import ParallelGroup

if TYPE_CHECKING:
    from nanovllm.layers.layernorm import RMSNorm
    from nanovllm.layers.linear import ColumnParallelLinear


@dataclass
class PartialSum:
    """A partial sum, and what follows its all-reduce: (linear(norm(total + residual)), total + residual);
    residual None: (linear(norm(total)), total); linear None (after the last layer): the norm alone."""
    partial: torch.Tensor  # [N, hidden]
    residual: torch.Tensor | None
    norm: "RMSNorm"
    linear: "ColumnParallelLinear | None"

    def then(self, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What follows, given the all-reduced total; the norm in the product's kernel where the device
        has one (ops.norm_linear)."""
        if self.linear is not None:
            return self.norm.then(self.linear, total, self.residual)
        return self.norm(total, self.residual) if self.residual is not None else (self.norm(total), total)

    def reduced(self, group: ParallelGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """All-reduce, then what follows: the all-reduce, add and norm in one kernel where the peer
        all-reduce takes them."""
        peer, norm = group.peer, self.norm
        if peer is not None and peer.fits_norm(self.partial, self.residual, norm.weight):
            normed, residual = peer.all_reduce_norm(self.partial, self.residual, norm.weight, norm.eps)
            return (normed if self.linear is None else self.linear(normed)), residual
        return self.then(group.all_reduce(self.partial))


# Yields partial sums, is sent what follows each, returns the pass's result.
PartialSums = Generator[PartialSum, tuple[torch.Tensor, torch.Tensor], torch.Tensor]


def run_reducing(steps: PartialSums, group: ParallelGroup) -> torch.Tensor:
    """Run steps, all-reducing each partial sum before it resumes; returns its result."""
    try:
        request = next(steps)
        while True:
            request = steps.send(request.reduced(group))
    except StopIteration as done:
        return done.value


def run_overlapped(micro_batches: list[tuple[PartialSums, AttentionMetadata]],
                   group: ParallelGroup) -> list[torch.Tensor]:
    """Run the micro-batches (each with its attention metadata) round robin, one stretch between two
    all-reduces at a time, each all-reduce queued without waiting; returns their results in order.
    Every rank must pass the same micro-batches in the same order, so that their collectives match."""
    results: list[torch.Tensor | None] = [None] * len(micro_batches)
    queue = deque()

    def queue_all_reduce(index: int, request: PartialSum) -> None:
        queue.append((index, request, group.all_reduce_async(request.partial)))

    for index, (steps, meta) in enumerate(micro_batches):
        set_context(meta)
        queue_all_reduce(index, next(steps))
    while queue:
        index, request, pending = queue.popleft()
        steps, meta = micro_batches[index]
        set_context(meta)
        try:
            queue_all_reduce(index, steps.send(request.then(pending.wait())))
        except StopIteration as done:
            results[index] = done.value
    return results
