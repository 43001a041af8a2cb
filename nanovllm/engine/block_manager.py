"""KV-cache blocks: allocation, reference counts and the prefix cache.

A full block is identified by a hash of its tokens chained with the previous block's hash, so equal
hashes mean equal prefixes. Freed blocks keep their hash and stay hittable until they are reused. A new
block is a free block that caches nothing, if there is one (the oldest freed), else the oldest freed
cached block: a cached prefix is evicted only when nothing else is free.
"""
from array import array
from collections import OrderedDict

import xxhash

from nanovllm.engine.sequence import Sequence

NO_HASH = -1


def chain_hash(token_ids: list[int], previous: int) -> int:
    h = xxhash.xxh64()
    if previous != NO_HASH:
        h.update(previous.to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    return h.intdigest()


class Block:
    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = NO_HASH
        self.token_ids: list[int] = []


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        # Insertion order = order of freeing: reuse the least recently freed block first (LRU eviction).
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # The free blocks that no prefix-cache entry points at, in the same order: taken first.
        self.free_uncached_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_free_uncached_blocks(self) -> int:
        """Free blocks that can be taken without evicting a cached prefix."""
        return len(self.free_uncached_ids)

    @staticmethod
    def _block_hash(seq: Sequence, i: int) -> int:
        """The chained hash of seq's full block i. A full block's tokens never change, so each hash is
        computed once per sequence (a waiting sequence is looked up again at every admission attempt)."""
        hashes = seq.block_hashes
        while len(hashes) <= i:
            hashes.append(chain_hash(seq.block_tokens(len(hashes)), hashes[-1] if hashes else NO_HASH))
        return hashes[i]

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding seq's leading full blocks. The last token is always left to compute,
        because the model needs at least one query to produce the next token's logits."""
        hits = []
        for i in range((len(seq) - 1) // self.block_size):
            block_id = self.hash_to_block_id.get(self._block_hash(seq, i))
            if block_id is None or self.blocks[block_id].token_ids != seq.block_tokens(i):
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cached_prefix(seq)
        hits_in_use = sum(1 for b in hits if self.blocks[b].ref_count > 0)
        return seq.num_blocks - hits_in_use <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give seq blocks for all its tokens, reusing cached prefix blocks."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already has blocks")
        hits = self._cached_prefix(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
                self.free_uncached_ids.pop(block_id, None)
            block.ref_count += 1
            seq.block_table.append(block_id)
        while len(seq.block_table) < seq.num_blocks:
            seq.block_table.append(self._take_free_block())
        seq.num_computed_tokens = len(hits) * self.block_size
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed_tokens

    def _take_free_block(self) -> int:
        if self.free_uncached_ids:
            block_id, _ = self.free_uncached_ids.popitem(last=False)
            del self.free_block_ids[block_id]
        else:
            block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash != NO_HASH and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]
        block.hash, block.token_ids, block.ref_count = NO_HASH, [], 1
        return block_id

    def deallocate(self, seq: Sequence) -> None:
        # Free the tail first so that, oldest-freed-first, a prefix's head blocks are evicted last.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
                if block.hash == NO_HASH or self.hash_to_block_id.get(block.hash) != block_id:
                    self.free_uncached_ids[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0

    def can_append(self, seq: Sequence) -> bool:
        return seq.num_blocks - len(seq.block_table) <= self.num_free_blocks

    def may_append(self, seq: Sequence) -> None:
        """Make room for every token of seq (the decode step writes the newest token's K/V)."""
        while len(seq.block_table) < seq.num_blocks:
            seq.block_table.append(self._take_free_block())

    def commit_computed(self, seq: Sequence, num_new_tokens: int) -> None:
        """Record that num_new_tokens more tokens of seq now have K/V, and hash blocks that became full."""
        first = seq.num_computed_tokens // self.block_size
        seq.num_computed_tokens += num_new_tokens
        last = seq.num_computed_tokens // self.block_size
        for i in range(first, last):
            block = self.blocks[seq.block_table[i]]
            block.token_ids = seq.block_tokens(i)
            block.hash = self._block_hash(seq, i)
            # An equal block may already be registered (e.g. a prompt ending on a block boundary is
            # recomputed); keep the first, this one stays private to seq.
            self.hash_to_block_id.setdefault(block.hash, block.block_id)
