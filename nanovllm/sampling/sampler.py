"""Batched sampling: a chain of small steps over the batch's logits on the device, each skipped when no
row needs it: min_tokens suppression, penalties, min-p, top-k / top-p, the draw. An all-greedy batch is
one argmax; a plain-temperature batch one noisy argmax. The only device-to-host read is the sampled ids
(and the logprobs, when asked)."""
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.engine.sequence import Sequence
from nanovllm.sampling.batch import SamplingBatch
from nanovllm.sampling.filters import apply_min_p, sample_from_candidates, sample_full
from nanovllm.sampling.logprobs import RawLogprobs
from nanovllm.sampling.penalties import PenaltyState
from nanovllm.utils.batch_rows import kept_rows


@dataclass
class SamplerOutput:
    token_ids: list[int]                              # [B]
    device_token_ids: torch.Tensor                    # [B] int64, the same ids on the device
    logprobs: list[dict[int, float] | None] | None    # [B] when some row asked, else None


class Sampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.penalty_state = PenaltyState()
        self.last_seq_ids: list[int] = []
        self.last_batch: SamplingBatch | None = None

    def _batch(self, seqs: list[Sequence], eos_token_ids: tuple[int, ...], vocab_size: int,
               device: torch.device) -> SamplingBatch:
        """This step's settings: the last step's when it sampled the same sequences (or the same less some
        that finished) and its settings do not change from step to step (the common decode step: no
        host pass over the rows)."""
        seq_ids = [seq.seq_id for seq in seqs]
        last = self.last_batch
        batch = None
        if last is not None and last.reusable:
            if seq_ids == self.last_seq_ids:
                return last
            kept = kept_rows(self.last_seq_ids, seq_ids)
            batch = last.keep_rows(kept, device) if kept is not None else None
        self.last_seq_ids = seq_ids
        self.last_batch = batch or SamplingBatch.build(seqs, eos_token_ids, vocab_size, device)
        return self.last_batch

    def forward(self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...]) -> SamplerOutput:
        """logits: [B, V], row b for seqs[b]. The logits may be changed in place."""
        vocab_size = logits.shape[1]
        batch = self._batch(seqs, eos_token_ids, vocab_size, logits.device)
        logits = logits.float()
        raw = RawLogprobs.compute(logits, batch.logprob_rows, batch.logprob_counts) if batch.logprob_rows else None
        if batch.suppressed is not None:
            logits[batch.suppressed] = float("-inf")
        penalty_rows = None
        if batch.penalized:
            penalty_rows = self.penalty_state.prepare(batch.penalized, vocab_size, logits.device)
            self.penalty_state.apply(logits, penalty_rows)
        elif self.penalty_state.entries:  # free the slots of finished sequences even when none use penalties
            self.penalty_state.release_finished()
        token_ids, needs_full_sort = self._sample(logits, batch)
        host_ids = self._read(token_ids, needs_full_sort, logits, batch)
        if penalty_rows is not None:
            self.penalty_state.record(penalty_rows, token_ids)
        return SamplerOutput(host_ids, token_ids, raw.read(token_ids, len(seqs)) if raw else None)

    @staticmethod
    def _sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns token ids [B] and, when the top-p path ran, the rows it could not settle [B] bool."""
        if batch.all_greedy:
            return logits.argmax(-1), None
        params = batch.params
        if batch.any_min_p:
            apply_min_p(logits, params)
        if not batch.num_candidates:
            return sample_full(logits, params), None
        rows = batch.candidate_rows
        if rows is None:
            return sample_from_candidates(logits, params, batch.num_candidates, batch.full_normalizer)
        # Mixed batch: rows without top-k / top-p take the full-vocabulary draw.
        token_ids = sample_full(logits, params)
        picked, short_mass = sample_from_candidates(logits[rows], params.take(rows), batch.num_candidates,
                                                    batch.full_normalizer)
        needs_full_sort = torch.zeros_like(token_ids, dtype=torch.bool).index_copy_(0, rows, short_mass)
        return token_ids.index_copy_(0, rows, picked), needs_full_sort

    @staticmethod
    def _read(token_ids: torch.Tensor, needs_full_sort: torch.Tensor | None, logits: torch.Tensor,
              batch: SamplingBatch) -> list[int]:
        """The one sync: the sampled ids, with the rows top-p could not settle among its candidates.
        Those (rare) rows are redone over the whole vocabulary; token_ids is updated in place."""
        if needs_full_sort is None:
            return token_ids.tolist()
        host_ids, redo = torch.stack((token_ids, needs_full_sort.long())).tolist()
        redo = [row for row, flag in enumerate(redo) if flag]
        if not redo:
            return host_ids
        rows = torch.tensor(redo, device=logits.device)
        picked, _ = sample_from_candidates(logits[rows], batch.params.take(rows), logits.shape[1], False)
        token_ids.index_copy_(0, rows, picked)
        return token_ids.tolist()
