"""Decode inputs that persist from step to step in one device buffer, which the CUDA graphs capture.

A decode step has one query per sequence: its newest token, at position len - 1. When the batch is
the previous decode step's (the same sequences in the same order) and that step's sampled ids are
on the device, every input is the previous one advanced by one token: the input ids are the sampled
ids, positions, cache slots and context lengths grow by one. That step does no per-sequence host
work and no upload, only three small kernels, plus a small patch for the sequences whose new token
opens a KV block (their slot jumps to the new block, and the block joins their table row). A batch
that only lost rows since (sequences finished) first moves its kept rows up on the device. Any other
batch is written on the host and sent in one copy.

Layout of the buffer, for R rows and M blocks per sequence: int64 [3, R] (input ids, positions,
slots), then int32 [R] context lengths and int32 [R, M] block tables. Rows past the batch are padding
(slot -1, context length 0, blocks -1) up to the padded size the step asks for (a graph's bucket).
"""
from collections import defaultdict

import numpy as np
import torch

from nanovllm.engine.input_batch import StepInputs
from nanovllm.engine.sequence import Sequence
from nanovllm.utils.batch_rows import kept_rows
from nanovllm.utils.context import AttentionMetadata
from nanovllm.utils.transfer import to_device


class DecodeInputs:
    def __init__(self, max_rows: int, max_blocks_per_seq: int, block_size: int, device: torch.device):
        rows, width = max_rows, max_blocks_per_seq
        self.max_rows, self.width, self.block_size, self.device = rows, width, block_size, device
        self._int64_bytes = 3 * rows * 8
        size = self._int64_bytes + 4 * rows * (1 + width)
        self.on_cuda = device.type == "cuda"
        self.host = torch.empty(size, dtype=torch.uint8, pin_memory=self.on_cuda)
        self.arena = torch.zeros(size, dtype=torch.uint8, device=device)
        self.copy_done = torch.cuda.Event() if self.on_cuda else None
        # Device views; rows [:B] of each are one step's inputs.
        (self.input_ids, self.positions, self.slots), self.context_lens, self.block_tables = self._views(self.arena)
        self._int64_rows = self.arena[:self._int64_bytes].view(torch.int64).view(3, rows)  # ids, positions, slots
        self.host.zero_()
        for buffer in (self.arena, self.host):  # padding everywhere until a batch is written
            (_, _, slots), _, tables = self._views(buffer)
            slots.fill_(-1)
            tables.fill_(-1)
        (ids, positions, slots), lens, tables = self._views(self.host)
        self._host_ids, self._host_positions, self._host_slots = ids.numpy(), positions.numpy(), slots.numpy()
        self._host_lens, self._host_tables = lens.numpy(), tables.numpy()
        # What the buffer holds: the batch (seq ids) it describes, None when it is not reusable.
        self.seq_ids: list[int] | None = None
        # The ids sampled at the last decode step (device, [B]); set by the runner once it succeeded.
        self.sampled: torch.Tensor | None = None
        self.padded_rows = 0        # rows [B, padded_rows) hold padding
        self.written_width = 0      # table columns that ever held block ids (the rest is -1)
        self.table_width = 0        # the batch's widest table
        self.next_lengths: list[int] = []  # each row's length at its next step, if it just grows
        self.step = 0               # fast steps since the batch was written
        self.block_starts: dict[int, list[int]] = {}  # step -> rows whose token that step opens a block

    def _views(self, buffer: torch.Tensor):
        rows, width = self.max_rows, self.width
        int64 = buffer[:self._int64_bytes].view(torch.int64).view(3, rows)
        int32 = buffer[self._int64_bytes:].view(torch.int32)
        return tuple(int64), int32[:rows], int32[rows:].view(rows, width)

    def prepare(self, seqs: list[Sequence], padded_rows: int, input_ids: torch.Tensor | None = None) -> StepInputs:
        """The step's inputs for seqs (B <= padded_rows <= max_rows rows); rows [B, padded_rows) padding.
        input_ids: this step's input ids on the device in seqs' order, when the caller has them (a
        tensor-parallel worker); otherwise the last step's sampled ids serve."""
        sampled, self.sampled = self.sampled, None
        seq_ids = [seq.seq_id for seq in seqs]
        lengths = [len(seq) for seq in seqs]
        kept = None
        if (sampled is not None or input_ids is not None) and self.seq_ids is not None \
                and padded_rows <= self.padded_rows:
            kept = kept_rows(self.seq_ids, seq_ids)
            # Each kept sequence must have grown by exactly one token since the buffers were last
            # advanced: a step whose tokens were dropped (an error after sampling) leaves it behind.
            if kept is not None and lengths != [self.next_lengths[row] for row in kept]:
                kept = None
        if kept is None:
            self._write(seqs, seq_ids, lengths, padded_rows)
        else:
            index = self._keep_rows(seqs, seq_ids, kept) if len(kept) < len(self.seq_ids) else None
            if input_ids is None:
                input_ids = sampled if index is None else sampled[index]
            self._advance(seqs, input_ids)
        self.next_lengths = [length + 1 for length in lengths]
        num_rows = len(seqs)
        meta = AttentionMetadata(is_prefill=False, slot_mapping=self.slots[:num_rows],
                                 context_lens=self.context_lens[:num_rows],
                                 block_tables=self.block_tables[:num_rows, :self.table_width],
                                 max_context_len=max(lengths))
        return StepInputs(self.input_ids[:num_rows], self.positions[:num_rows], meta, None, [True] * num_rows)

    def _keep_rows(self, seqs: list[Sequence], seq_ids: list[int], kept: list[int]) -> torch.Tensor:
        """The batch lost rows: move the kept ones (kept[i]: the old row of row i) up, in order, and
        pad the rows they leave. Returns kept as a device index."""
        num_rows, old_rows = len(kept), len(self.seq_ids)
        index = to_device(kept, torch.int64, self.device)
        int64_rows = self._int64_rows
        int64_rows[:, :num_rows] = int64_rows[:, index]
        self.context_lens[:num_rows] = self.context_lens[index]
        self.block_tables[:num_rows] = self.block_tables[index]
        int64_rows[:2, num_rows:old_rows] = 0
        self.slots[num_rows:old_rows] = -1
        self.context_lens[num_rows:old_rows] = 0
        self.block_tables[num_rows:old_rows] = -1
        new_row = {old: new for new, old in enumerate(kept)}
        self.block_starts = {step: [new_row[row] for row in rows if row in new_row]
                             for step, rows in self.block_starts.items()}
        self.seq_ids = seq_ids
        self.table_width = max(len(seq.block_table) for seq in seqs)
        return index

    def _advance(self, seqs: list[Sequence], input_ids: torch.Tensor) -> None:
        num_rows = len(seqs)
        self.input_ids[:num_rows].copy_(input_ids)
        self._int64_rows[1:, :num_rows] += 1  # positions and slots
        self.context_lens[:num_rows] += 1
        self.step += 1
        opening = self.block_starts.pop(self.step, None)
        if opening:
            self._open_blocks(seqs, opening)

    def _open_blocks(self, seqs: list[Sequence], rows: list[int]) -> None:
        """The new token of each of rows sits at offset 0 of a block the scheduler just appended."""
        columns = [(len(seqs[row]) - 1) // self.block_size for row in rows]
        blocks = [seqs[row].block_table[column] for row, column in zip(rows, columns)]
        rows_d, columns_d, blocks_d = to_device([rows, columns, blocks], torch.int64, self.device)
        self.block_tables[rows_d, columns_d] = blocks_d.int()
        self.slots[rows_d] = blocks_d * self.block_size
        self.table_width = max(self.table_width, max(columns) + 1)
        self.written_width = max(self.written_width, self.table_width)
        self.block_starts.setdefault(self.step + self.block_size, []).extend(rows)

    def _write(self, seqs: list[Sequence], seq_ids: list[int], lengths: list[int], padded_rows: int) -> None:
        num_rows, block_size = len(seqs), self.block_size
        if any(seq.has_placeholder for seq in seqs):
            raise RuntimeError("a step scheduled ahead must follow the last step's batch on the device")
        if self.copy_done is not None:
            self.copy_done.synchronize()  # the previous upload must have left the host buffer
        positions = np.array(lengths, dtype=np.int64) - 1
        tables = [seq.block_table for seq in seqs]
        self._host_ids[:num_rows] = [seq.token_ids[-1] for seq in seqs]
        self._host_positions[:num_rows] = positions
        self._host_slots[:num_rows] = [table[p // block_size] * block_size + p % block_size
                                       for table, p in zip(tables, positions.tolist())]
        self._host_lens[:num_rows] = lengths
        for part, pad in ((self._host_ids, 0), (self._host_positions, 0), (self._host_slots, -1), (self._host_lens, 0)):
            part[num_rows:padded_rows] = pad
        self.table_width = max(map(len, tables))
        self.written_width = max(self.written_width, self.table_width)
        host_tables = self._host_tables
        host_tables[:padded_rows, :self.written_width] = -1
        for row, table in enumerate(tables):
            host_tables[row, :len(table)] = table
        # One copy: the int64 part, the lengths and the first padded_rows table rows are contiguous.
        end = self._int64_bytes + 4 * self.max_rows + 4 * padded_rows * self.width
        self.arena[:end].copy_(self.host[:end], non_blocking=True)
        if self.copy_done is not None:
            self.copy_done.record()
        self.seq_ids = seq_ids
        self.padded_rows = padded_rows
        # A token opens a block when its position is a multiple of block_size: the k-th step from now.
        self.step = 0
        self.block_starts = defaultdict(list)
        for row, p in enumerate(positions.tolist()):
            self.block_starts[block_size - p % block_size].append(row)
        self.block_starts = dict(self.block_starts)
