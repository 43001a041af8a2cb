"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.linear import divide
from nanovllm.utils.distributed import current_group


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp = current_group()
        self.vocab_size = vocab_size
        # Pad the vocabulary so it splits evenly; padded rows are never looked up.
        self.padded_vocab_size = -(-vocab_size // self.tp.world_size) * self.tp.world_size
        self.shard_size = divide(self.padded_vocab_size, self.tp.world_size)
        self.vocab_start = self.tp.rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        rows = loaded[self.vocab_start:self.vocab_start + self.shard_size]
        param.data[:rows.shape[0]].copy_(rows)
        param.data[rows.shape[0]:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [N] -> [N, hidden], this rank's partial sum (the rows of its slice, zeros elsewhere),
        which the caller all-reduces (utils/partial_sums.py)."""
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.shard_size)
        return F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * mine.unsqueeze(-1)


class ParallelLMHead(VocabParallelEmbedding):
    def forward(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor | None:
        """hidden: [B, hidden] -> logits [B, vocab_size] on rank 0, which alone samples; None on the
        other ranks (gathering to one rank moves half what an all-gather does at two ranks).
        gather=False: this rank's slice, [B, shard_size] (tokens vocab_start.., padding past vocab_size)."""
        logits = F.linear(hidden, self.weight)
        if not gather:
            return logits
        logits = self.tp.gather(logits, dim=-1)
        return None if logits is None else logits[:, :self.vocab_size]
