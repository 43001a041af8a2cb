"""Batched sampling: one pass over the batch's logits on the device."""
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.sampling_params import SamplingParams


@dataclass
class SamplingBatch:
    """The per-row sampling settings of one step, as device tensors."""
    temperatures: torch.Tensor  # [B] float32, 0 = greedy
    all_greedy: bool

    @classmethod
    def build(cls, params: list[SamplingParams], device: torch.device) -> "SamplingBatch":
        temperatures = [p.temperature for p in params]
        return cls(torch.tensor(temperatures, dtype=torch.float32).to(device, non_blocking=True),
                   all_greedy=not any(temperatures))


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """logits: [B, V] -> token ids [B] int64."""
        greedy = logits.argmax(-1)
        if batch.all_greedy:
            return greedy
        temperatures = batch.temperatures
        # Greedy rows get temperature 1 here; their sampled value is replaced by the argmax below.
        scaled = logits.float() / torch.where(temperatures > 0, temperatures, 1.0).unsqueeze(1)
        probs = scaled.softmax(-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p without a cumulative sum.
        sampled = probs.div_(torch.empty_like(probs).exponential_(1)).argmax(-1)
        return torch.where(temperatures > 0, sampled, greedy)
