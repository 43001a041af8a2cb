"""Persistent decode inputs: a step that advances the previous batch's buffers on the device gives
exactly the inputs that writing the batch from scratch gives, across block openings, padding,
batches that lose rows and batches that change."""
import random

import torch

from nanovllm.engine.decode_inputs import DecodeInputs
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

BLOCK_SIZE, MAX_ROWS, MAX_BLOCKS = 4, 8, 16


def expected(seqs: list[Sequence], padded_rows: int):
    """(input ids, positions, slots, context lens) [padded_rows] and block tables [B, width] as lists."""
    positions = [len(seq) - 1 for seq in seqs]
    slots = [seq.block_table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for seq, p in zip(seqs, positions)]
    pad = padded_rows - len(seqs)
    width = max(len(seq.block_table) for seq in seqs)
    tables = [seq.block_table + [-1] * (width - len(seq.block_table)) for seq in seqs]
    return ([seq.token_ids[-1] for seq in seqs] + [0] * pad, positions + [0] * pad, slots + [-1] * pad,
            [len(seq) for seq in seqs] + [0] * pad, tables)


def test_advancing_gives_the_inputs_a_rewrite_gives():
    rng = random.Random(0)
    free_blocks = list(range(MAX_ROWS * MAX_BLOCKS))
    rng.shuffle(free_blocks)  # blocks anywhere in the cache

    def grow_table(seq):  # what the scheduler does before a step: a block for every token
        while len(seq.block_table) * BLOCK_SIZE < len(seq):
            seq.block_table.append(free_blocks.pop())

    def new_seq():
        seq = Sequence([rng.randrange(100) for _ in range(rng.randint(1, 9))], SamplingParams(), BLOCK_SIZE)
        grow_table(seq)
        return seq

    inputs = DecodeInputs(MAX_ROWS, MAX_BLOCKS, BLOCK_SIZE, torch.device("cpu"))
    kept_rows_calls = []
    keep_rows = inputs._keep_rows
    inputs._keep_rows = lambda *args: kept_rows_calls.append(1) or keep_rows(*args)
    batch = [new_seq() for _ in range(6)]
    advanced = 0
    for step in range(80):
        if step % 17 == 16:  # the batch changes: one leaves, two join
            batch = batch[1:] + [new_seq(), new_seq()]
        elif step % 7 == 6 and len(batch) > 1:  # a sequence finishes: the others keep their order
            del batch[rng.randrange(len(batch))]
        padded_rows = 8 if len(batch) > 4 else 4
        advanced += inputs.seq_ids is not None and inputs.sampled is not None and padded_rows <= inputs.padded_rows
        step_inputs = inputs.prepare(batch, padded_rows)
        ids, positions, slots, lens, tables = expected(batch, padded_rows)
        meta = step_inputs.meta
        assert inputs.input_ids[:padded_rows].tolist() == ids
        assert inputs.positions[:padded_rows].tolist() == positions
        assert inputs.slots[:padded_rows].tolist() == slots
        assert inputs.context_lens[:padded_rows].tolist() == lens
        assert meta.block_tables.tolist() == tables
        assert (inputs.block_tables[len(batch):padded_rows] == -1).all()  # padding rows
        assert meta.max_context_len == max(lens)
        assert step_inputs.input_ids.tolist() == ids[:len(batch)] and meta.slot_mapping.tolist() == slots[:len(batch)]
        sampled = [rng.randrange(100) for _ in batch]
        for seq, token in zip(batch, sampled):
            seq.token_ids.append(token)
            grow_table(seq)
        inputs.sampled = torch.tensor(sampled)
    assert advanced > 60  # most steps took the fast path, including block openings (every 4 tokens)
    assert len(kept_rows_calls) >= 5  # ... and steps after a sequence left


def test_a_step_whose_sampling_never_finished_is_rewritten():
    inputs = DecodeInputs(MAX_ROWS, MAX_BLOCKS, BLOCK_SIZE, torch.device("cpu"))
    seq = Sequence([1, 2, 3], SamplingParams(), BLOCK_SIZE)
    seq.block_table = [7]
    inputs.prepare([seq], 1)
    seq.token_ids.append(9)  # the host got a token but the device ids were never handed over
    inputs.prepare([seq], 1)
    assert inputs.input_ids[0].item() == 9 and inputs.positions[0].item() == 3 and inputs.slots[0].item() == 31
