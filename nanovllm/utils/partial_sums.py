"""Running a model written as a generator of partial sums.

A tensor-parallel forward pass stops at the embedding and at each row-parallel projection: there every
rank holds a partial sum that an all-reduce completes. Qwen3Model.partial_sums is that pass as a
generator: it yields each partial sum and is sent back the complete one. The same code then runs two ways:

- run_reducing: one batch, each all-reduce in turn (ParallelGroup.all_reduce: peer memory or NCCL, a
  no-op at one rank). Decode steps, and their CUDA graphs, run this way.
- run_overlapped: a tensor-parallel prefill step split into micro-batches. Each partial sum's all-reduce
  is queued on the collective's own stream (NCCL; gloo: its own thread), and the next micro-batch
  computes meanwhile; a micro-batch waits for its sum only when it resumes. A 16K-token prefill step of
  Qwen3-8B at TP=2 runs 73 NCCL all-reduces of 128 MB, about 0.5 ms each on 2 x H200, some 15% of the
  step: overlapped, they hide behind the other micro-batch's matrix products.
"""
from collections import deque
from collections.abc import Generator

import torch

from nanovllm.utils.context import AttentionMetadata, set_context
from nanovllm.utils.distributed import ParallelGroup

# Yields partial sums, is sent their all-reduced sums, returns the pass's result.
PartialSums = Generator[torch.Tensor, torch.Tensor, torch.Tensor]


def run_reducing(steps: PartialSums, group: ParallelGroup) -> torch.Tensor:
    """Run steps, all-reducing each partial sum before it resumes; returns its result."""
    try:
        partial = next(steps)
        while True:
            partial = steps.send(group.all_reduce(partial))
    except StopIteration as done:
        return done.value


def run_overlapped(micro_batches: list[tuple[PartialSums, AttentionMetadata]],
                   group: ParallelGroup) -> list[torch.Tensor]:
    """Run the micro-batches (each with its attention metadata) round robin, one stretch between two
    all-reduces at a time, each all-reduce queued without waiting; returns their results in order.
    Every rank must pass the same micro-batches in the same order, so that their collectives match."""
    results: list[torch.Tensor | None] = [None] * len(micro_batches)
    queue = deque()
    for index, (steps, meta) in enumerate(micro_batches):
        set_context(meta)
        queue.append((index, group.all_reduce_async(next(steps))))
    while queue:
        index, pending = queue.popleft()
        steps, meta = micro_batches[index]
        set_context(meta)
        try:
            queue.append((index, group.all_reduce_async(steps.send(pending.wait()))))
        except StopIteration as done:
            results[index] = done.value
    return results
