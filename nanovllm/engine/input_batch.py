"""Turns a scheduled batch into the model's input tensors and the step's attention metadata."""
from dataclasses import dataclass

import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.utils.context import AttentionMetadata


@dataclass
class StepInputs:
    input_ids: torch.Tensor        # [N] int64
    positions: torch.Tensor        # [N] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor   # [S] int64: rows of the hidden states to sample from
    sampled: list[bool]            # [B]: whether each sequence gets a token this step


class InputBuilder:
    def __init__(self, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device
        # Pinned host memory lets the host-to-device copies run asynchronously.
        self.pin = device.type == "cuda"

    def _to_device(self, values, dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, pin_memory=self.pin).to(self.device, non_blocking=True)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(seq.block_table) for seq in seqs)
        return self._to_device([seq.block_table + [-1] * (width - len(seq.block_table)) for seq in seqs],
                               torch.int32)

    def _slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def prefill(self, seqs: list[Sequence]) -> StepInputs:
        input_ids, positions, slots, cu_seqlens_q, context_lens, logits_indices, sampled = [], [], [], [0], [], [], []
        for seq in seqs:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_scheduled_tokens
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [self._slot(seq, p) for p in range(start, end)]
            cu_seqlens_q.append(cu_seqlens_q[-1] + end - start)
            context_lens.append(end)
            # Only a sequence whose whole prompt is now computed gets its next token.
            sampled.append(end == len(seq))
            if sampled[-1]:
                logits_indices.append(cu_seqlens_q[-1] - 1)
        meta = AttentionMetadata(
            is_prefill=True, slot_mapping=self._to_device(slots, torch.int64),
            context_lens=self._to_device(context_lens, torch.int32), block_tables=self._block_tables(seqs),
            cu_seqlens_q=self._to_device(cu_seqlens_q, torch.int32),
            max_seqlen_q=max(s.num_scheduled_tokens for s in seqs), max_context_len=max(context_lens))
        return StepInputs(self._to_device(input_ids, torch.int64), self._to_device(positions, torch.int64),
                          meta, self._to_device(logits_indices, torch.int64), sampled)

    def decode(self, seqs: list[Sequence]) -> StepInputs:
        """One query per sequence: its newest token, at position len(seq) - 1."""
        context_lens = [len(seq) for seq in seqs]
        meta = AttentionMetadata(
            is_prefill=False, slot_mapping=self._to_device([self._slot(s, len(s) - 1) for s in seqs], torch.int64),
            context_lens=self._to_device(context_lens, torch.int32), block_tables=self._block_tables(seqs),
            max_context_len=max(context_lens))
        return StepInputs(self._to_device([s.last_token for s in seqs], torch.int64),
                          self._to_device([n - 1 for n in context_lens], torch.int64),
                          meta, torch.arange(len(seqs), device=self.device), [True] * len(seqs))
