"""Batched sampling: a chain of small steps over the batch's logits on the device, each skipped when no
row needs it: min_tokens suppression, penalties, min-p, top-k / top-p, the draw. A batch with no
control but temperature is one noisy argmax (on CUDA, from 64 rows, one Triton kernel: race_kernel.py).
The only device-to-host read is the sampled ids (and the logprobs, when asked), and it waits until the
caller first uses them."""
import torch
from torch import nn

from nanovllm.engine.sequence import Sequence
from nanovllm.sampling.batch import SamplingBatch
from nanovllm.sampling.filters import apply_min_p, sample_from_candidates, sample_full
from nanovllm.sampling.logprobs import RawLogprobs
from nanovllm.sampling.penalties import PenaltyState
from nanovllm.utils.batch_rows import kept_rows

# The race kernel gives each row one program, which walks the whole vocabulary: on an H200 (BENCHMARKS.md)
# 0.20 ms for 256 rows against 0.53 ms for the torch kernels, but 0.11 ms for one row against 0.02 ms.
RACE_KERNEL_MIN_ROWS = 64


class SamplerOutput:
    """A step's sampled ids (and logprobs), on the device at once and read to the host on first use,
    so the caller can queue more device work (the next step) before it waits for them."""

    def __init__(self, device_token_ids: torch.Tensor, raw: RawLogprobs | None):
        self.device_token_ids = device_token_ids  # [B] int64
        self._raw = raw
        self._host_token_ids = None
        self._logprobs = None
        # Start the copies now, behind this step's work alone; reading waits for them, not for the
        # device work queued after (the next step).
        parts = [device_token_ids] + (raw.select(device_token_ids) if raw else [])
        if device_token_ids.is_cuda:
            self._copies = [torch.empty(part.shape, dtype=part.dtype, pin_memory=True) for part in parts]
            for copy, part in zip(self._copies, parts):
                copy.copy_(part, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._copies, self._copied = parts, None

    def _host(self) -> list[torch.Tensor]:
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        return self._copies

    @property
    def token_ids(self) -> list[int]:  # [B]
        if self._host_token_ids is None:
            self._host_token_ids = self._host()[0].tolist()
        return self._host_token_ids

    @property
    def logprobs(self) -> list[dict[int, float] | None] | None:
        """[B] when some row asked, else None."""
        if self._raw is not None and self._logprobs is None:
            parts = self._host()[1:]
            self._logprobs = self._raw.assemble([part.tolist() for part in parts], len(self.device_token_ids))
        return self._logprobs


class Sampler(nn.Module):
    def __init__(self):
        super().__init__()
        self.penalty_state = PenaltyState()
        self.last_seq_ids: list[int] = []
        self.last_batch: SamplingBatch | None = None

    def compile_kernels(self, vocab_size: int, row_stride: int, dtype: torch.dtype, device: torch.device) -> None:
        """Compile the CUDA draw kernel for logits of this layout ([B, vocab_size], rows row_stride apart)
        now, at start-up, instead of at the first batch of RACE_KERNEL_MIN_ROWS rows, mid-run."""
        from nanovllm.sampling.race_kernel import race

        logits = torch.zeros(RACE_KERNEL_MIN_ROWS, row_stride, dtype=dtype, device=device)[:, :vocab_size]
        race(logits, torch.ones(RACE_KERNEL_MIN_ROWS, device=device))

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

    def settings(self, seqs: list[Sequence], eos_token_ids: tuple[int, ...], vocab_size: int,
                 device: torch.device) -> SamplingBatch:
        """This step's sampling settings (pass them on to forward: a batch whose settings change from
        step to step, such as one with seeded rows, is built anew on every call)."""
        batch = self._batch(seqs, eos_token_ids, vocab_size, device)
        if not batch.penalized and self.penalty_state.entries:
            self.penalty_state.release_finished()  # free finished sequences' slots even when none use penalties
        return batch

    def forward(self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...],
                settings: SamplingBatch | None = None) -> SamplerOutput:
        """logits: [B, V], row b for seqs[b]. The logits may be changed in place. settings: what
        settings(seqs, ...) returned this step, if the caller already asked for them."""
        vocab_size = logits.shape[1]
        batch = settings if settings is not None else self.settings(seqs, eos_token_ids, vocab_size, logits.device)
        if batch.only_temperature and batch.all_greedy:
            return SamplerOutput(logits.argmax(-1), None)  # in the logits' own dtype: the same maximum
        if logits.is_cuda and batch.only_temperature and len(seqs) >= RACE_KERNEL_MIN_ROWS:
            from nanovllm.sampling.race_kernel import race  # Triton: imported on CUDA only

            return SamplerOutput(race(logits, batch.params.temperature), None)
        logits = logits.float()
        raw = RawLogprobs.compute(logits, batch.logprob_rows, batch.logprob_counts) if batch.logprob_rows else None
        if batch.suppressed is not None:
            logits[batch.suppressed] = float("-inf")
        penalty_rows = None
        if batch.penalized:
            penalty_rows = self.penalty_state.prepare(batch.penalized, vocab_size, logits.device)
            self.penalty_state.apply(logits, penalty_rows)
        token_ids, needs_full_sort = self._sample(logits, batch)
        # Rows top-p could not settle are redone now (a sync): the ids on the device must be final
        # when this returns, as the next step may take them as its inputs before they are read.
        if needs_full_sort is not None:
            self._redo_short_rows(token_ids, needs_full_sort, logits, batch)
        if penalty_rows is not None:
            self.penalty_state.record(penalty_rows, token_ids)
        return SamplerOutput(token_ids, raw)

    @staticmethod
    def _sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns token ids [B] and, when some row has top-p without top-k (only those can fall
        short), the rows the top-p path could not settle [B] bool."""
        if batch.all_greedy:
            return logits.argmax(-1), None
        params = batch.params
        if batch.any_min_p:
            apply_min_p(logits, params)
        if not batch.num_candidates:
            return sample_full(logits, params), None
        rows = batch.candidate_rows
        if rows is None:
            token_ids, short_mass = sample_from_candidates(logits, params, batch.num_candidates,
                                                           batch.full_normalizer)
            return token_ids, short_mass if batch.full_normalizer else None
        # Mixed batch: rows without top-k / top-p take the full-vocabulary draw.
        token_ids = sample_full(logits, params)
        picked, short_mass = sample_from_candidates(logits[rows], params.take(rows), batch.num_candidates,
                                                    batch.full_normalizer)
        token_ids.index_copy_(0, rows, picked)
        if not batch.full_normalizer:
            return token_ids, None
        return token_ids, torch.zeros_like(token_ids, dtype=torch.bool).index_copy_(0, rows, short_mass)

    @staticmethod
    def _redo_short_rows(token_ids: torch.Tensor, needs_full_sort: torch.Tensor, logits: torch.Tensor,
                         batch: SamplingBatch) -> None:
        """Redo, over the whole vocabulary, the (rare) rows top-p could not settle among its candidates;
        token_ids is updated in place. Reading the flags is a sync."""
        redo = needs_full_sort.nonzero().squeeze(1)
        if len(redo):
            picked, _ = sample_from_candidates(logits[redo], batch.params.take(redo), logits.shape[1], False)
            token_ids.index_copy_(0, redo, picked)
