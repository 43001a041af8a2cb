"""Turns a scheduled prefill batch into the model's input tensors and the step's attention metadata
(decode steps: decode_inputs.py)."""
from dataclasses import dataclass
from itertools import chain

import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.utils.context import AttentionMetadata


@dataclass
class StepInputs:
    input_ids: torch.Tensor        # [N] int64
    positions: torch.Tensor        # [N] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor | None  # [S] int64: rows of the hidden states to sample from; None: all
    sampled: list[bool]            # [B]: whether each sequence gets a token this step


class InputBuilder:
    def __init__(self, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device
        self.on_cuda = device.type == "cuda"
        # One pinned staging buffer, reused each step: a single asynchronous host-to-device copy per
        # step instead of one pinned allocation and one copy per tensor.
        self.staging = torch.empty(0, dtype=torch.int64, pin_memory=self.on_cuda)
        self.copy_done = torch.cuda.Event() if self.on_cuda else None

    def _upload(self, *parts: list[int]) -> list[torch.Tensor]:
        """Copy int lists to the device in one transfer; returns one int64 device tensor per part."""
        # Each part starts 16-byte aligned (an even number of int64s): kernels compiled for aligned
        # pointers are not recompiled when a part's offset changes.
        lengths = [len(p) for p in parts]
        parts = [p + [0] * (len(p) % 2) for p in parts]
        total = sum(map(len, parts))
        if self.on_cuda:
            self.copy_done.synchronize()  # the previous step's copy must have left the staging buffer
            if self.staging.numel() < total:
                self.staging = torch.empty(2 * total, dtype=torch.int64, pin_memory=True)
        host = torch.tensor(list(chain.from_iterable(parts)), dtype=torch.int64)
        if self.on_cuda:
            host = self.staging[:total].copy_(host)
        flat = host.to(self.device, non_blocking=True)
        if self.on_cuda:
            self.copy_done.record()
        return [part[:n] for part, n in zip(flat.split([len(p) for p in parts]), lengths)]

    def _block_table_rows(self, seqs: list[Sequence]) -> tuple[list[int], int]:
        width = max(len(seq.block_table) for seq in seqs)
        return list(chain.from_iterable(seq.block_table + [-1] * (width - len(seq.block_table)) for seq in seqs)), width

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Cache slots of positions [start, end): one range per block, not one Python call per token."""
        slots, position = [], start
        while position < end:
            block = position // self.block_size
            block_end = min(end, (block + 1) * self.block_size)
            offset = (seq.block_table[block] - block) * self.block_size  # logical -> physical slot
            slots += range(position + offset, block_end + offset)
            position = block_end
        return slots

    def prefill(self, seqs: list[Sequence]) -> StepInputs:
        input_ids, positions, slots, cu_seqlens_q, context_lens, logits_indices, sampled = [], [], [], [0], [], [], []
        for seq in seqs:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_scheduled_tokens
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += self._slots(seq, start, end)
            cu_seqlens_q.append(cu_seqlens_q[-1] + end - start)
            context_lens.append(end)
            # Only a sequence whose whole prompt is now computed gets its next token.
            sampled.append(end == len(seq))
            if sampled[-1]:
                logits_indices.append(cu_seqlens_q[-1] - 1)
        block_tables, width = self._block_table_rows(seqs)
        ids, pos, slot_mapping, lens, tables, cu_q, logits_rows = self._upload(
            input_ids, positions, slots, context_lens, block_tables, cu_seqlens_q, logits_indices)
        meta = AttentionMetadata(
            is_prefill=True, slot_mapping=slot_mapping, context_lens=lens.int(),
            block_tables=tables.int().view(len(seqs), width), cu_seqlens_q=cu_q.int(),
            max_seqlen_q=max(s.num_scheduled_tokens for s in seqs), max_context_len=max(context_lens))
        return StepInputs(ids, pos, meta, logits_rows, sampled)
