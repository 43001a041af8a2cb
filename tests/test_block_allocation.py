"""The block manager: allocation at block boundaries, prefix sharing, ref counts, freeing and reuse."""
import pytest

from nanovllm.engine.block_manager import NO_HASH, BlockManager
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

BS = 16


def seq_of(tokens) -> Sequence:
    return Sequence(list(tokens), SamplingParams(), BS)


def computed(bm: BlockManager, seq: Sequence) -> Sequence:
    """Allocate seq and mark its whole prompt as computed (what a finished prefill does)."""
    bm.allocate(seq)
    bm.commit_computed(seq, len(seq) - seq.num_computed_tokens)
    return seq


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    refs = {}
    for seq in live:
        for b in seq.block_table:
            refs[b] = refs.get(b, 0) + 1
    for block in bm.blocks:
        assert block.ref_count == refs.get(block.block_id, 0)
        assert (block.block_id in bm.free_block_ids) == (block.ref_count == 0)
        registered = bm.hash_to_block_id.get(block.hash) == block.block_id
        assert (block.block_id in bm.free_uncached_ids) == (block.ref_count == 0 and not registered)
    for h, b in bm.hash_to_block_id.items():
        assert bm.blocks[b].hash == h


@pytest.mark.parametrize("length", [1, BS - 1, BS, BS + 1, 2 * BS, 2 * BS + 1, 3 * BS - 1])
def test_allocate_gives_one_block_per_started_block(length):
    bm = BlockManager(8, BS)
    seq = seq_of(range(length))
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert len(seq.block_table) == -(-length // BS)
    assert bm.num_free_blocks == 8 - len(seq.block_table)
    check_invariants(bm, [seq])


@pytest.mark.parametrize("length", [BS - 1, BS, BS + 1])
def test_decode_appends_a_block_only_when_the_last_is_full(length):
    """len % block_size == 0, == 1 and otherwise: a new block exactly when the new token starts one."""
    bm = BlockManager(8, BS)
    seq = computed(bm, seq_of(range(length)))
    blocks_before = len(seq.block_table)
    seq.append_token(7)
    assert bm.can_append(seq)
    bm.may_append(seq)
    assert len(seq.block_table) == blocks_before + (length % BS == 0)
    check_invariants(bm, [seq])


def test_prompt_exactly_one_block_is_recomputed_not_hit():
    """A prompt of exactly one block has no cacheable prefix: its last token must run through the model."""
    bm = BlockManager(4, BS)
    first = computed(bm, seq_of(range(BS)))
    assert bm.blocks[first.block_table[0]].hash != NO_HASH
    second = seq_of(range(BS))
    bm.allocate(second)
    assert second.num_computed_tokens == 0 and second.block_table != first.block_table
    check_invariants(bm, [first, second])


def test_shared_prefix_is_shared_and_ref_counted():
    bm = BlockManager(8, BS)
    a = computed(bm, seq_of(list(range(2 * BS)) + [1, 2, 3]))
    b = seq_of(list(range(2 * BS)) + [9])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.num_cached_tokens == b.num_computed_tokens == 2 * BS
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    check_invariants(bm, [a, b])
    bm.deallocate(a)
    assert [bm.blocks[i].ref_count for i in b.block_table[:2]] == [1, 1]
    check_invariants(bm, [b])
    bm.deallocate(b)
    assert bm.num_free_blocks == 8
    check_invariants(bm, [])


def test_hit_requires_matching_tokens_not_just_a_hash():
    bm = BlockManager(8, BS)
    a = computed(bm, seq_of(list(range(BS)) + [1]))
    h = bm.blocks[a.block_table[0]].hash
    bm.blocks[a.block_table[0]].token_ids = [999] * BS  # as if a different block collided on the hash
    b = seq_of(list(range(BS)) + [2])
    bm.allocate(b)
    assert b.num_computed_tokens == 0 and bm.hash_to_block_id[h] == a.block_table[0]


def test_freed_blocks_stay_hittable_until_reused():
    bm = BlockManager(4, BS)
    a = computed(bm, seq_of(list(range(2 * BS)) + [5]))
    cached = a.block_table[:2]
    bm.deallocate(a)
    b = seq_of(list(range(2 * BS)) + [6])
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table[:2] == cached and b.num_computed_tokens == 2 * BS
    check_invariants(bm, [b])


def test_preempted_sequence_is_readmitted_over_its_cached_prefix():
    bm = BlockManager(8, BS)
    seq = computed(bm, seq_of(range(2 * BS + 3)))
    for t in range(BS):  # decode into the third block until it is full, then one more
        seq.append_token(t)
        bm.may_append(seq)
        bm.commit_computed(seq, 1)
    bm.deallocate(seq)  # preemption frees everything
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    seq.num_preemptions += 1
    bm.allocate(seq)
    assert seq.num_computed_tokens == 3 * BS  # prompt blocks and the decoded full block all hit
    check_invariants(bm, [seq])


def test_empty_block_table_deallocates_cleanly():
    bm = BlockManager(4, BS)
    seq = seq_of([1, 2, 3])
    bm.deallocate(seq)
    assert bm.num_free_blocks == 4 and seq.block_table == []


def test_cannot_allocate_beyond_free_blocks():
    bm = BlockManager(2, BS)
    computed(bm, seq_of(range(BS + 1)))
    assert not bm.can_allocate(seq_of(range(100, 100 + BS)))


def test_eviction_reuses_least_recently_freed_block_and_unregisters_its_hash():
    bm = BlockManager(2, BS)
    a = computed(bm, seq_of(list(range(BS)) + [1]))
    full_block = a.block_table[0]
    bm.deallocate(a)
    b = computed(bm, seq_of(range(500, 500 + 2 * BS)))  # needs both blocks: evicts a's
    assert full_block in b.block_table
    assert all(bm.blocks[b_id].hash != NO_HASH for b_id in b.block_table)
    check_invariants(bm, [b])


def test_a_new_block_evicts_a_cached_prefix_only_when_nothing_else_is_free():
    bm = BlockManager(5, BS)
    a = computed(bm, seq_of(list(range(2 * BS)) + [1]))  # two cached full blocks and a partial one
    cached, partial = a.block_table[:2], a.block_table[2]
    bm.deallocate(a)  # freed after the never-used blocks 3 and 4: the cached ones are the oldest freed
    b = seq_of(range(700, 710))
    bm.allocate(b)  # one block: the oldest free block that caches nothing
    c = seq_of(range(800, 2 * BS + 800))
    bm.allocate(c)  # two more: still not cached ones
    assert not set(cached) & set(b.block_table + c.block_table) and partial in b.block_table + c.block_table
    assert bm.num_free_uncached_blocks == 0
    again = seq_of(list(range(2 * BS)))
    bm.allocate(again)
    assert again.block_table == cached and again.num_computed_tokens == BS  # the last token is recomputed
    check_invariants(bm, [b, c, again])
