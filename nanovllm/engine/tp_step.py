"""What rank 0 tells the other ranks about a step: only what changed since they last heard.

A worker keeps a mirror of every sequence it has seen. Per step rank 0 sends, for each scheduled
sequence, the tokens appended since the last message (a new sequence's whole prompt once, then one
token per decode step), the block-table entries past those the worker already has, and the two
counters that place this step's queries. Finished sequences are named once so the worker forgets them.
A step scheduled ahead (asynchronous scheduling) ends its sequences with a PLACEHOLDER, sent as is:
the next message sends that position again, with the token it stood for.
"""
from dataclasses import dataclass

from nanovllm.engine.sequence import PLACEHOLDER, Sequence
from nanovllm.sampling.shard_draw import ShardDraw

# (seq_id, num_tokens_kept, new_token_ids, num_blocks_kept, new_block_ids, num_computed_tokens,
#  num_scheduled_tokens)
SeqUpdate = tuple[int, int, list[int], int, list[int], int, int]


@dataclass
class StepCall:
    is_prefill: bool
    updates: list[SeqUpdate]  # [B], in batch order
    forget: list[int]         # seq ids finished since the last step
    draw: ShardDraw | None = None  # every rank draws over its slice of the vocabulary (shard_draw.py)


class _Sent:
    """What the workers know about one sequence."""

    def __init__(self, seq: Sequence):
        self.seq = seq
        self.num_tokens = 0
        self.block_table: list[int] = []  # the list object last sent from, to notice a new one
        self.num_blocks = 0


class StepEncoder:
    """Rank 0's record of what the workers know; turns a scheduled batch into a StepCall."""

    def __init__(self):
        self.sent: dict[int, _Sent] = {}

    def encode(self, seqs: list[Sequence], is_prefill: bool, draw: ShardDraw | None = None) -> StepCall:
        # Finished (or aborted) sequences are never scheduled again; at most max_num_seqs are tracked.
        forget = [seq_id for seq_id, sent in self.sent.items() if sent.seq.is_finished]
        for seq_id in forget:
            del self.sent[seq_id]
        updates = []
        for seq in seqs:
            sent = self.sent.get(seq.seq_id)
            if sent is None:
                sent = self.sent[seq.seq_id] = _Sent(seq)
            kept_tokens = sent.num_tokens
            new_tokens = seq.token_ids[kept_tokens:]  # token lists only grow (bar a placeholder)
            # Block tables grow in place; freeing a sequence's blocks (preemption) gives it a new list.
            table = seq.block_table
            kept = sent.num_blocks if table is sent.block_table and len(table) >= sent.num_blocks else 0
            updates.append((seq.seq_id, kept_tokens, new_tokens, kept, table[kept:], seq.num_computed_tokens,
                            seq.num_scheduled_tokens))
            sent.num_tokens = len(seq.token_ids) - seq.has_placeholder
            sent.block_table, sent.num_blocks = table, len(table)
        return StepCall(is_prefill, updates, forget, draw)


class SequenceMirror:
    """A worker's copy of rank 0's sequences, enough to build the same model inputs."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.seqs: dict[int, Sequence] = {}

    def apply(self, call: StepCall) -> list[Sequence]:
        """Update the mirror with call; returns the step's batch."""
        for seq_id in call.forget:
            self.seqs.pop(seq_id, None)
        batch = []
        for seq_id, kept_tokens, new_tokens, kept, new_blocks, num_computed, num_scheduled in call.updates:
            seq = self.seqs.get(seq_id)
            if seq is None:
                seq = self.seqs[seq_id] = Sequence([], None, self.block_size)
            del seq.token_ids[kept_tokens:]
            seq.token_ids += new_tokens
            seq.has_placeholder = seq.token_ids[-1] == PLACEHOLDER
            del seq.block_table[kept:]
            seq.block_table += new_blocks
            seq.num_computed_tokens, seq.num_scheduled_tokens = num_computed, num_scheduled
            batch.append(seq)
        return batch
