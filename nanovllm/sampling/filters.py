"""Temperature, min-p, top-k and top-p, and the draw itself, on a batch of rows of logits.

In the race (noise.py) temperature scales the noise, argmax(l / T - log E) = argmax(l - T log E) for
T > 0, instead of costing a pass over the logits, and T = 0 leaves argmax(l): greedy rows need no branch.
Top-k and top-p never sort the vocabulary: `sample_from_candidates` takes the K most likely tokens
(K = the largest top_k, or TOP_P_CANDIDATES for top-p rows without top-k; topk(50) over [256, 151936]
costs a fifth of a full sort, DESIGN.md), filters and draws among them. A top-p row whose K candidates hold less than top_p of the mass (a very flat
distribution) is flagged, and the sampler redoes it over the whole vocabulary (K = V): exact, and the
flag travels with the sampled ids, so the common case costs no extra device-to-host sync.
"""
from dataclasses import dataclass

import torch

from nanovllm.sampling.noise import draw

TOP_P_CANDIDATES = 1024


@dataclass
class RowParams:
    """Per-row settings on the device; shapes [R]."""
    temperature: torch.Tensor   # float32, 0 = greedy
    top_k: torch.Tensor         # int64, 0 = off (the sampler clamps it to the vocabulary)
    top_p: torch.Tensor         # float32, 1 = off
    min_p: torch.Tensor         # float32, 0 = off
    seeded_uniform: torch.Tensor | None  # float32 in (0, 1) for seeded rows, -1 others; None: none seeded
    all_seeded: bool = False

    def take(self, rows: torch.Tensor) -> "RowParams":
        """The settings of a subset of the rows."""
        return RowParams(self.temperature[rows], self.top_k[rows], self.top_p[rows], self.min_p[rows],
                         None if self.seeded_uniform is None else self.seeded_uniform[rows], self.all_seeded)


def apply_min_p(logits: torch.Tensor, params: RowParams) -> None:
    """In place: -inf for tokens less likely than min_p times the most likely one. Since softmax(l / T)
    has one normalizer per row, p_v >= min_p * p_max  <=>  l_v >= l_max + T * log(min_p)."""
    slack = params.temperature * params.min_p.log()  # -inf where min_p == 0 (and T > 0): keeps all
    slack = torch.where(params.min_p > 0, slack, float("-inf"))
    threshold = logits.amax(-1) + slack
    logits.masked_fill_(logits < threshold.unsqueeze(1), float("-inf"))


def sample_full(logits: torch.Tensor, params: RowParams) -> torch.Tensor:
    """Draw from softmax(logits / T) over the whole vocabulary: logits [R, V] -> token ids [R]."""
    return draw(logits, params.temperature, params.seeded_uniform, params.all_seeded)


def sample_from_candidates(logits: torch.Tensor, params: RowParams, num_candidates: int,
                           full_normalizer: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k, then top-p over what top-k left (as vLLM and transformers order them), then the draw.

    logits [R, V] (min-p already applied); num_candidates: K >= every row's top_k; full_normalizer: some
    row has top-p without top-k, so its probabilities need the whole row's normalizer.
    Returns token ids [R] and short_mass [R] bool: rows whose candidates hold less than top_p.
    """
    num_rows, vocab_size = logits.shape
    values, token_ids = logits.topk(num_candidates, dim=-1)  # [R, K], most likely first
    position = torch.arange(num_candidates, device=logits.device)
    uses_top_k = params.top_k > 0
    row_k = torch.where(uses_top_k, params.top_k, num_candidates)
    values = values.masked_fill(position >= row_k.unsqueeze(1), float("-inf"))

    # Top-p: probabilities of the distribution top-k left. A top-k row's normalizer is its candidates';
    # a row without top-k needs the whole vocabulary's.
    temperature = torch.where(params.temperature > 0, params.temperature, 1.0).unsqueeze(1)
    scaled = values / temperature
    normalizer = scaled.logsumexp(-1)
    if full_normalizer:
        normalizer = torch.where(uses_top_k, normalizer, (logits / temperature).logsumexp(-1))
    probs = (scaled - normalizer.unsqueeze(1)).exp()
    mass = probs.cumsum(-1)
    uses_top_p = params.top_p < 1.0
    # Keep a token while the mass before it is below top_p: the token that crosses top_p stays.
    keep = (mass - probs < params.top_p.unsqueeze(1)) | ~uses_top_p.unsqueeze(1)
    values = values.masked_fill(~keep, float("-inf"))
    # Greedy rows (T = 0) take the argmax whatever the nucleus: never worth a full-vocabulary redo.
    short_mass = (uses_top_p & ~uses_top_k & (mass[:, -1] < params.top_p) & (num_candidates < vocab_size)
                  & (params.temperature > 0))

    choice = draw(values, params.temperature, params.seeded_uniform, params.all_seeded,
                  weights=probs.masked_fill(~keep, 0.0))
    return token_ids.gather(1, choice.unsqueeze(1)).squeeze(1), short_mass
