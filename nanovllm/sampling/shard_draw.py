"""Tensor-parallel decode steps that draw their tokens without gathering the logits.

Each rank's LM head holds a contiguous slice of the vocabulary. When a step needs nothing but the draw
(temperature only: greedy rows and the exponential race of noise.py), every rank draws over its own
slice and shares one (score, token) pair per row, instead of sending rank 0 its [B, V / N] logits
(39 MB at 256 rows of Qwen3-8B's vocabulary at two ranks); rank 0 keeps the pair with the highest score.
The pairs are shared by an all-reduce of a board that each rank fills only in its own row: where the
peer all-reduce serves, that is its kernel, not NCCL's gather (about 80 us of kernel time a step at
64 rows of Qwen3-8B on 2 x H200, profile_kernels.py) and a concatenation. The draws
are the same: a greedy row's winner is the first maximum of the whole row (slices are in rank order,
and among equal scores the lowest rank wins), and the race's noise for each token depends only on
the shared seed, the row and the token (race_kernel.py).

Rank 0 plans the draw before the step is sent (it alone has the sampling settings); the plan travels
in the step's message, so every rank draws the same way.
"""
from dataclasses import dataclass

import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.layers.embed_head import ParallelLMHead
from nanovllm.sampling.batch import SamplingBatch
from nanovllm.sampling.sampler import RACE_KERNEL_MIN_ROWS
from nanovllm.utils.distributed import ParallelGroup
from nanovllm.utils.transfer import to_device


@dataclass(frozen=True)
class ShardDraw:
    """How every rank draws a step's tokens over its slice: greedy (temperature None) or the race,
    with each row's temperature and one seed."""
    temperature: list[float] | None = None
    seed: int = 0


def plan_shard_draw(batch: SamplingBatch, seqs: list[Sequence], device: torch.device) -> ShardDraw | None:
    """The draw for a decode step of seqs whose sampling settings are batch, or None when it needs the
    whole logits on rank 0: any control but temperature, or rows to sample on the CPU or fewer than
    RACE_KERNEL_MIN_ROWS of them (where the sampler does not race either)."""
    if not batch.only_temperature:
        return None
    if batch.all_greedy:
        return ShardDraw()
    if device.type != "cuda" or len(seqs) < RACE_KERNEL_MIN_ROWS:
        return None
    # Drawn from torch's default generator, as race() draws its seed: torch.manual_seed repeats a run.
    seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
    return ShardDraw([seq.sampling_params.temperature for seq in seqs], seed)


def draw_slice(logits: torch.Tensor, draw: ShardDraw, vocab_start: int, vocab_size: int,
               temperature: torch.Tensor | None = None) -> torch.Tensor:
    """logits: [B, S], tokens vocab_start.. of this rank's slice (columns past vocab_size are padding)
    -> [B, 2] float32: each row's best score and its token (exact: Config caps a tensor-parallel
    vocabulary at MAX_PARALLEL_VOCAB). temperature: draw.temperature already on the device, if the
    caller has it (rank 0's sampling settings); otherwise it is uploaded."""
    logits = logits[:, :max(0, vocab_size - vocab_start)]
    if draw.temperature is None:
        columns = logits.argmax(-1)  # the first of equal maxima
        scores, tokens = logits.gather(1, columns.unsqueeze(1)).squeeze(1), columns + vocab_start
    else:
        from nanovllm.sampling.race_kernel import race_slice  # Triton: CUDA only

        if temperature is None:
            temperature = to_device(draw.temperature, torch.float32, logits.device)
        tokens, scores = race_slice(logits, temperature, draw.seed, vocab_start, vocab_size)
    return torch.stack([scores.float(), tokens.float()], 1)


def best_of_slices(pairs: torch.Tensor) -> torch.Tensor:
    """pairs: [B, N, 2] every rank's (score, token) in rank order -> [B] int64: the token of the highest
    score, the lowest rank's among equal scores."""
    best = pairs[..., 0].argmax(-1)
    return pairs[..., 1].gather(1, best.unsqueeze(1)).squeeze(1).long()


def draw_on_shards(logits: torch.Tensor, draw: ShardDraw, head: ParallelLMHead, group: ParallelGroup,
                   temperature: torch.Tensor | None = None) -> torch.Tensor | None:
    """Every rank together: logits [B, S] this rank's slice (head.forward(hidden, gather=False)) -> the
    drawn token ids [B] int64 on rank 0, None on the others. temperature: as draw_slice's."""
    pairs = draw_slice(logits, draw, head.vocab_start, head.vocab_size, temperature)
    board = torch.zeros(group.world_size, *pairs.shape, dtype=pairs.dtype, device=pairs.device)  # [N, B, 2]
    board[group.rank] = pairs
    group.all_reduce(board)  # x + 0 is x: every rank's pairs, exactly, on every rank
    return best_of_slices(board.transpose(0, 1)) if group.rank == 0 else None


def compile_shard_draw(head: ParallelLMHead, dtype: torch.dtype, device: torch.device) -> None:
    """Compile the race over this rank's slice now, at start-up, instead of at the first batch of
    RACE_KERNEL_MIN_ROWS rows, mid-run (Triton specializes on the slice's width and stride)."""
    logits = torch.zeros(RACE_KERNEL_MIN_ROWS, head.shard_size, dtype=dtype, device=device)
    draw_slice(logits, ShardDraw([1.0] * RACE_KERNEL_MIN_ROWS), head.vocab_start, head.vocab_size)
