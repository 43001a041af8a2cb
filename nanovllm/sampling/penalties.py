"""Repetition, presence and frequency penalties, with the token history they need kept on the device.

A sequence that uses penalties gets a slot while it lives: its tokens (prompt + generated) and how often
each token was generated. The slot is filled once, when the sequence is first sampled, and then grows by
the sampled token of each step on the device, so a step does O(batch) host work, never O(tokens).
Applying the penalties touches only the history's positions ([P, L] gathers and scatters), not the
[B, V] logits as a whole.
"""
from dataclasses import dataclass, replace

import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.utils.batch_rows import kept_rows
from nanovllm.utils.transfer import to_device


@dataclass
class PenaltyRows:
    """This step's rows that use penalties; tensors are [P] on the device."""
    rows: torch.Tensor        # int64: row in the batch
    slots: torch.Tensor       # int64: slot in the PenaltyState
    lengths: torch.Tensor     # int64: tokens in the history (prompt + generated so far)
    repetition: torch.Tensor  # float32, 1 = off
    presence: torch.Tensor    # float32, 0 = off
    frequency: torch.Tensor   # float32, 0 = off
    max_length: int
    any_repetition: bool
    any_presence_or_frequency: bool


class PenaltyState:
    def __init__(self):
        self.history: torch.Tensor | None = None  # [slots, width] int32: the slot's tokens
        self.counts: torch.Tensor | None = None   # [slots, V] int32: times each token was generated
        self.free_slots: list[int] = []
        # seq_id -> (slot, sequence, tokens the device history will hold after this step's record),
        # as of the last full prepare; the steps advanced since then are added when it is next needed.
        self.entries: dict[int, tuple[int, Sequence, int]] = {}
        # The last step's rows: the next step of the same rows advances them on the device.
        self.last_penalized: list[tuple[int, Sequence]] | None = None
        self.last_rows: PenaltyRows | None = None
        self.last_recorded = False
        self.steps_advanced = 0
        self.next_lengths: list[int] = []  # each last-step row's length at its next step

    def _grow(self, num_slots: int, width: int, vocab_size: int, device: torch.device) -> None:
        old_slots, old_width = (0, 0) if self.history is None else self.history.shape
        if num_slots <= old_slots and width <= old_width:
            return
        new_slots = max(num_slots, 2 * old_slots, 8)
        new_width = max(old_width, 1 << (width - 1).bit_length())
        history = torch.zeros(new_slots, new_width, dtype=torch.int32, device=device)
        counts = torch.zeros(new_slots, vocab_size, dtype=torch.int32, device=device)
        if self.history is not None:
            history[:old_slots, :old_width] = self.history
            counts[:old_slots] = self.counts
        self.history, self.counts = history, counts
        self.free_slots += range(old_slots, new_slots)

    def release_finished(self) -> None:
        for seq_id in [i for i, (_, seq, _) in self.entries.items() if seq.is_finished]:
            self.free_slots.append(self.entries.pop(seq_id)[0])

    def _fill(self, slot: int, seq: Sequence, device: torch.device) -> None:
        if seq.has_placeholder:
            raise RuntimeError("a step scheduled ahead must carry its penalty histories over on the device")
        self.history[slot, :len(seq)] = torch.tensor(seq.token_ids, dtype=torch.int32).to(device)
        self.counts[slot].zero_()
        if seq.num_completion_tokens:
            generated = torch.tensor(seq.completion_token_ids, device=device)
            self.counts[slot].index_add_(0, generated, torch.ones_like(generated, dtype=torch.int32))

    def prepare(self, penalized: list[tuple[int, Sequence]], vocab_size: int, device: torch.device) -> PenaltyRows:
        """penalized: (batch row, sequence) pairs. Gives new sequences a slot and their history."""
        recorded, self.last_recorded = self.last_recorded, False
        lengths = [len(seq) for _, seq in penalized]
        rows = self._carry_over(penalized, lengths, device) if recorded else None
        if rows is None:
            rows = self._prepare_afresh(penalized, vocab_size, device)
        self.next_lengths = [length + 1 for length in lengths]
        return rows

    def _carry_over(self, penalized: list[tuple[int, Sequence]], lengths: list[int],
                    device: torch.device) -> PenaltyRows | None:
        """The last step's rows, advanced on the device by the token it recorded, when penalized holds the
        last step's sequences (or some of them, in order) each one token longer; else None. A step whose
        tokens were dropped after recording (an error) fails the check: its histories are refilled."""
        rows = self.last_rows
        if rows is None or rows.max_length + 1 >= self.history.shape[1]:
            return None
        if penalized is self.last_penalized:
            if lengths != self.next_lengths:
                return None
            rows.lengths += 1
            rows.max_length += 1
            self.steps_advanced += 1
            return rows
        kept = kept_rows([seq.seq_id for _, seq in self.last_penalized], [seq.seq_id for _, seq in penalized])
        if kept is None or lengths != [self.next_lengths[row] for row in kept]:
            return None
        return self._keep_rows(penalized, kept, device)

    def _prepare_afresh(self, penalized: list[tuple[int, Sequence]], vocab_size: int,
                        device: torch.device) -> PenaltyRows:
        self._catch_up_entries()
        self.release_finished()
        new = sum(1 for _, seq in penalized if seq.seq_id not in self.entries)
        self._grow(len(self.entries) + new, max(len(seq) for _, seq in penalized) + 1, vocab_size, device)
        rows, slots, lengths, repetition, presence, frequency = [], [], [], [], [], []
        for row, seq in penalized:
            entry, length = self.entries.get(seq.seq_id), len(seq)
            slot = self.free_slots.pop() if entry is None else entry[0]
            if entry is None or entry[2] != length:  # new, or a step failed between prepare and record
                self._fill(slot, seq, device)
            self.entries[seq.seq_id] = (slot, seq, length + 1)
            p = seq.sampling_params
            rows.append(row)
            slots.append(slot)
            lengths.append(length)
            repetition.append(p.repetition_penalty)
            presence.append(p.presence_penalty)
            frequency.append(p.frequency_penalty)
        ints = to_device([rows, slots, lengths], torch.int64, device)
        floats = to_device([repetition, presence, frequency], torch.float32, device)
        self.last_penalized = penalized
        self.last_rows = PenaltyRows(*ints, *floats, max(lengths), any_repetition=any(r != 1.0 for r in repetition),
                                     any_presence_or_frequency=any(presence) or any(frequency))
        return self.last_rows

    def _keep_rows(self, penalized: list[tuple[int, Sequence]], kept: list[int], device: torch.device) -> PenaltyRows:
        """The last step's rows less some that finished (kept[i]: the old position of row i), each
        history one token longer: taken from the last step's rows on the device."""
        self._catch_up_entries()
        last = self.last_rows
        index = to_device(kept, torch.int64, device)
        self.last_rows = replace(
            last, rows=to_device([row for row, _ in penalized], torch.int64, device), slots=last.slots[index],
            lengths=last.lengths[index] + 1, repetition=last.repetition[index], presence=last.presence[index],
            frequency=last.frequency[index], max_length=last.max_length + 1)
        self.last_penalized = penalized
        self.steps_advanced = 1
        return self.last_rows

    def _catch_up_entries(self) -> None:
        """Add the steps advanced without a full prepare to the expected lengths of the rows they ran."""
        if self.steps_advanced:
            for _, seq in self.last_penalized:
                entry = self.entries.get(seq.seq_id)  # None: finished and released since
                if entry is not None:
                    self.entries[seq.seq_id] = (entry[0], seq, entry[2] + self.steps_advanced)
            self.steps_advanced = 0

    def apply(self, logits: torch.Tensor, rows: PenaltyRows) -> None:
        """In place on logits [B, V], in vLLM's order: repetition, then presence and frequency."""
        token_ids = self.history[:, :rows.max_length].index_select(0, rows.slots).long()  # [P, L]
        valid = torch.arange(rows.max_length, device=logits.device) < rows.lengths.unsqueeze(1)
        # Padding repeats position 0: every write to one (row, token) below carries the same value,
        # so duplicate indices in the scatter are harmless.
        token_ids = torch.where(valid, token_ids, token_ids[:, :1])
        batch_rows = rows.rows.unsqueeze(1).expand_as(token_ids)
        if rows.any_repetition:  # transformers' RepetitionPenaltyLogitsProcessor, over prompt + generated
            penalty = rows.repetition.unsqueeze(1)
            scores = logits[batch_rows, token_ids]
            logits[batch_rows, token_ids] = torch.where(scores < 0, scores * penalty, scores / penalty)
        if rows.any_presence_or_frequency:  # OpenAI's: logit -= presence * [count > 0] + frequency * count
            counts = self.counts[rows.slots.unsqueeze(1), token_ids].float()  # 0 for prompt-only tokens
            penalty = rows.frequency.unsqueeze(1) * counts + rows.presence.unsqueeze(1) * (counts > 0)
            logits[batch_rows, token_ids] = logits[batch_rows, token_ids] - penalty

    def record(self, rows: PenaltyRows, token_ids: torch.Tensor) -> None:
        """Append this step's sampled tokens (token_ids [B] on the device) to the histories."""
        self.last_recorded = True
        sampled = token_ids.index_select(0, rows.rows)
        self.history[rows.slots, rows.lengths] = sampled.int()
        self.counts.index_put_((rows.slots, sampled), torch.ones_like(sampled, dtype=torch.int32), accumulate=True)
