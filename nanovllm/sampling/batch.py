"""One step's sampling settings: read from the sequences in one host pass, moved to the device in a few
packed copies, with host-side flags that let the sampler skip every step no row needs."""
from dataclasses import dataclass, replace

import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.sampling.filters import TOP_P_CANDIDATES, RowParams
from nanovllm.sampling.noise import seeded_uniform
from nanovllm.utils.transfer import to_device


@dataclass
class SamplingBatch:
    params: RowParams
    all_greedy: bool
    any_min_p: bool
    num_candidates: int                   # K of the top-k / top-p path; 0 when no row takes it
    candidate_rows: torch.Tensor | None   # [C] int64 rows taking that path; None: every row
    full_normalizer: bool                 # some candidate row has top-p without top-k
    suppressed: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) set to -inf: min_tokens
    penalized: list[tuple[int, Sequence]]  # (row, sequence) for rows using penalties
    logprob_rows: list[int]
    logprob_counts: list[int]
    # Nothing in it changes from step to step (no seeded rows, no min_tokens): the next step of the
    # same sequences can reuse it as it is.
    reusable: bool = False

    @property
    def only_temperature(self) -> bool:
        """No control but temperature (greedy rows included): the draw is the whole sampling step."""
        return (not self.any_min_p and not self.num_candidates and self.params.seeded_uniform is None
                and self.suppressed is None and not self.penalized and not self.logprob_rows)

    def keep_rows(self, kept: list[int], device: torch.device) -> "SamplingBatch | None":
        """These settings for a batch that lost rows (kept[i]: the old row of row i), without a pass
        over the sequences; None for a batch that mixes the candidate and full-vocabulary paths. The
        host flags stay as they were: a flag that no kept row needs any more only costs a no-op step."""
        if self.candidate_rows is not None:
            return None
        new_row = {old: new for new, old in enumerate(kept)}
        logprobs = [(new_row[row], count) for row, count in zip(self.logprob_rows, self.logprob_counts)
                    if row in new_row]
        return replace(self, params=self.params.take(to_device(kept, torch.int64, device)),
                       penalized=[(new_row[row], seq) for row, seq in self.penalized if row in new_row],
                       logprob_rows=[row for row, _ in logprobs], logprob_counts=[count for _, count in logprobs])

    @classmethod
    def build(cls, seqs: list[Sequence], eos_token_ids: tuple[int, ...], vocab_size: int,
              device: torch.device) -> "SamplingBatch":
        # One pass with only cheap work for rows that use no extra control: it runs every step.
        temperature, top_k, top_p, min_p = [], [], [], []
        candidate_rows, uniforms, suppressed, penalized, logprob_rows, logprob_counts = [], [], [], [], [], []
        any_min_tokens = False
        for row, seq in enumerate(seqs):
            p = seq.sampling_params
            temperature.append(p.temperature)
            top_k.append(p.top_k)
            top_p.append(p.top_p)
            min_p.append(p.min_p)
            if p.temperature and (p.top_k > 0 or p.top_p < 1.0):
                candidate_rows.append(row)
            # A seed matters only when sampling; a greedy row stays greedy.
            uniforms.append(-1.0 if p.seed is None or not p.temperature
                            else seeded_uniform(p.seed, seq.sample_index, seq.num_completion_tokens))
            any_min_tokens = any_min_tokens or p.min_tokens > 0
            if p.min_tokens and seq.num_completion_tokens < p.min_tokens:
                eos = () if p.ignore_eos else eos_token_ids
                suppressed += [(row, t) for t in (*(p.stop_token_ids or ()), *eos)]
            if p.uses_penalties:
                penalized.append((row, seq))
            if p.logprobs is not None:
                logprob_rows.append(row)
                logprob_counts.append(p.logprobs)

        num_seeded = len(uniforms) - uniforms.count(-1.0)
        values = to_device([temperature, top_k, top_p, min_p, uniforms], torch.float32, device)
        params = RowParams(values[0], values[1].long().clamp_(0, vocab_size), values[2], values[3],
                           values[4] if num_seeded else None, all_seeded=num_seeded == len(seqs))
        # K: the largest top_k of the candidate rows, or TOP_P_CANDIDATES for a top-p row without one.
        row_k = [min(top_k[r], vocab_size) if top_k[r] > 0 else TOP_P_CANDIDATES for r in candidate_rows]
        num_greedy = temperature.count(0)
        return cls(
            params, all_greedy=num_greedy == len(seqs), any_min_p=any(min_p),
            num_candidates=min(max(row_k, default=0), vocab_size),
            # Greedy rows are served by either path, so they need not split the batch.
            candidate_rows=None if not candidate_rows or len(candidate_rows) + num_greedy == len(seqs)
            else to_device(candidate_rows, torch.int64, device),
            full_normalizer=any(top_k[r] <= 0 for r in candidate_rows),
            suppressed=tuple(to_device(list(zip(*suppressed)), torch.int64, device)) if suppressed else None,
            penalized=penalized, logprob_rows=logprob_rows, logprob_counts=logprob_counts,
            reusable=not num_seeded and not any_min_tokens)
