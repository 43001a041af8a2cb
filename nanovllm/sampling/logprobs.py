"""Log-probabilities for the rows that ask for them, from the raw model logits (vLLM's default: before
penalties, temperature and filtering), so they match log_softmax of the model's output."""
from dataclasses import dataclass

import torch


@dataclass
class RawLogprobs:
    rows: list[int]             # batch rows that asked
    counts: list[int]           # how many top tokens each of them wants
    logprobs: torch.Tensor      # [R, V] float32
    top: tuple[torch.Tensor, torch.Tensor] | None  # values and token ids [R, max(counts)]

    @classmethod
    def compute(cls, logits: torch.Tensor, rows: list[int], counts: list[int]) -> "RawLogprobs":
        """Call before anything changes the logits in place. logits: [B, V] float32."""
        index = torch.tensor(rows, device=logits.device)
        logprobs = logits.index_select(0, index).log_softmax(-1)
        top = logprobs.topk(max(counts), dim=-1) if max(counts) else None
        return cls(rows, counts, logprobs, top)

    def select(self, token_ids: torch.Tensor) -> list[torch.Tensor]:
        """The device tensors the output needs, given the sampled ids [B]: the rows' sampled ids and
        their logprobs [R], then the top values and ids [R, max(counts)] when counts ask for any."""
        sampled = token_ids.index_select(0, torch.tensor(self.rows, device=token_ids.device))
        parts = [sampled, self.logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1)]
        return parts + (list(self.top) if self.top is not None else [])

    def assemble(self, parts: list[list], batch_size: int) -> list[dict[int, float] | None]:
        """parts: select()'s tensors as lists. Returns, per batch row, None or a dict {token_id:
        logprob} holding the sampled token first, then the top tokens, most likely first."""
        sampled, sampled_logprobs, *top = parts
        top_values, top_ids = top if top else ([], [])
        out: list[dict[int, float] | None] = [None] * batch_size
        for i, (row, count) in enumerate(zip(self.rows, self.counts)):
            entry = {sampled[i]: sampled_logprobs[i]}
            for j in range(count):
                entry.setdefault(top_ids[i][j], top_values[i][j])
            out[row] = entry
        return out
