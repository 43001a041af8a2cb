"""Block manager and scheduler under random workloads (hypothesis, stateful): requests with shared
prefixes arrive, steps run with a simulated model that writes a fake KV cache and samples random tokens
(eos included), requests are aborted or end on a stop string, and a tiny cache forces preemption.
After every step the block accounting, the prefix cache and the scheduler's limits hold; in the end
every request finishes and every block is free again."""
from collections import Counter

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nanovllm.engine.block_manager import NO_HASH, BlockManager, chain_hash
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams

EOS = 0
VOCAB = 4  # a tiny alphabet, so that equal blocks (prefix hits) are common
PREFIXES = [[1, 2, 3, 1, 2, 3, 1, 2, 3, 1], [1, 2, 3, 1, 3, 3, 3], [2] * 12]
MAX_STEPS_TO_DRAIN = 5_000


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(4, 16),
                max_num_seqs=st.integers(1, 6), max_num_batched_tokens=st.integers(1, 24),
                max_model_len=st.integers(8, 40))
    def setup(self, block_size, num_blocks, max_num_seqs, max_num_batched_tokens, max_model_len):
        self.block_size = block_size
        self.manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(max_num_seqs, max_num_batched_tokens, self.manager, (EOS,), max_model_len)
        # The fake KV cache: slot -> the token prefix whose last token's K/V the slot holds.
        self.kv: dict[int, tuple[int, ...]] = {}
        self.live: list[Sequence] = []

    # ---- actions -----------------------------------------------------------------------------------
    @rule(prefix=st.sampled_from(PREFIXES), prefix_len=st.integers(0, 12),
          suffix=st.lists(st.integers(0, VOCAB - 1), max_size=10), max_tokens=st.integers(1, 12),
          ignore_eos=st.booleans(), first=st.booleans())
    def add(self, prefix, prefix_len, suffix, max_tokens, ignore_eos, first):
        """first: queued ahead of the waiting requests, as the engine queues the n > 1 siblings of a
        request whose prompt was just computed."""
        prompt = prefix[:prefix_len] + suffix
        most_tokens = min(len(prompt) + max_tokens, self.scheduler.max_model_len)
        # The engine rejects these up front: too long, or never fitting the cache even alone.
        if not prompt or len(prompt) >= self.scheduler.max_model_len \
                or -(-most_tokens // self.block_size) > self.manager.num_blocks:
            return
        seq = Sequence(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos),
                       self.block_size)
        self.scheduler.add(seq, first=first)
        self.live.append(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def step(self, data):
        self.run_one_step(lambda: data.draw(st.integers(0, VOCAB - 1), label="sampled token"))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data):
        seq = data.draw(st.sampled_from(self.live), label="aborted")
        self.scheduler.abort([seq])
        assert seq.block_table == [] and seq.finish_reason == "abort"
        self.live.remove(seq)

    @precondition(lambda self: self.scheduler.running)
    @rule(data=st.data())
    def stop_string(self, data):
        """The engine finishes a running sequence whose text reached a stop string."""
        seq = data.draw(st.sampled_from(list(self.scheduler.running)), label="stopped")
        assert self.scheduler.stop(seq, "stop here")
        assert seq.block_table == [] and seq.finish_reason == "stop"
        self.live.remove(seq)

    def run_one_step(self, sample) -> None:
        seqs, is_prefill = self.scheduler.schedule()
        assert seqs, "requests are pending but nothing was scheduled"
        assert sum(s.num_scheduled_tokens for s in seqs) <= self.scheduler.max_num_batched_tokens
        assert len(self.scheduler.running) <= self.scheduler.max_num_seqs
        assert len({s.seq_id for s in seqs}) == len(seqs)
        if is_prefill:
            self.check_admitted_all_that_fit(seqs)
        tokens = []
        for seq in seqs:
            self.check_cached_kv(seq)
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_scheduled_tokens
            assert 1 <= seq.num_scheduled_tokens and end <= len(seq) and (is_prefill or end == len(seq))
            assert len(seq.block_table) * self.block_size >= end
            for position in range(start, end):  # the model writes K/V of the scheduled tokens
                self.kv[self.slot(seq, position)] = tuple(seq.token_ids[:position + 1])
            tokens.append(sample() if end == len(seq) else None)
        for seq in self.scheduler.postprocess(seqs, tokens):
            assert seq.is_finished and seq.block_table == []
            self.live.remove(seq)

    # ---- checks --------------------------------------------------------------------------------------
    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def check_admitted_all_that_fit(self, seqs: list[Sequence]) -> None:
        """A prefill step stops admitting only for a reason: the token budget is spent, the batch is
        full, or the next request's blocks are not free."""
        waiting = self.scheduler.waiting
        if not waiting or waiting[0].block_table:
            return
        assert (sum(s.num_scheduled_tokens for s in seqs) == self.scheduler.max_num_batched_tokens
                or len(self.scheduler.running) >= self.scheduler.max_num_seqs
                or not self.manager.can_allocate(waiting[0]))

    def check_cached_kv(self, seq: Sequence) -> None:
        """Every token the scheduler treats as computed (written by this sequence or reused from the
        prefix cache) has its own prefix's K/V in the cache: what the attention will read."""
        for position in range(seq.num_computed_tokens):
            assert self.kv.get(self.slot(seq, position)) == tuple(seq.token_ids[:position + 1])

    @invariant()
    def blocks_are_free_xor_used_and_ref_counted(self):
        holders = Counter(b for seq in self.live for b in seq.block_table)
        for seq in self.live:
            assert len(set(seq.block_table)) == len(seq.block_table)
        for block in self.manager.blocks:
            assert block.ref_count == holders[block.block_id]
            assert (block.block_id in self.manager.free_block_ids) == (block.ref_count == 0)
            # The uncached free blocks (taken first) are exactly the free ones no hash points at.
            registered = self.manager.hash_to_block_id.get(block.hash) == block.block_id
            assert (block.block_id in self.manager.free_uncached_ids) == (block.ref_count == 0 and not registered)

    @invariant()
    def hash_map_points_at_matching_blocks(self):
        for h, block_id in self.manager.hash_to_block_id.items():
            block = self.manager.blocks[block_id]
            assert block.hash == h and len(block.token_ids) == self.block_size
        # Along each sequence the full computed blocks carry the chained hash of their tokens.
        for seq in self.live:
            previous = NO_HASH
            for i in range(seq.num_computed_tokens // self.block_size):
                block = self.manager.blocks[seq.block_table[i]]
                previous = chain_hash(seq.block_tokens(i), previous)
                assert block.token_ids == seq.block_tokens(i) and block.hash == previous

    @invariant()
    def queues_hold_exactly_the_live_sequences(self):
        waiting, running = self.scheduler.waiting, self.scheduler.running
        assert sorted(s.seq_id for s in [*waiting, *running]) == sorted(s.seq_id for s in self.live)
        assert len(running) <= self.scheduler.max_num_seqs
        assert all(s.status == SequenceStatus.RUNNING for s in running)
        assert all(s.status == SequenceStatus.WAITING for s in waiting)
        # Only the head of `waiting` may hold blocks (a prompt prefilled in chunks).
        assert all(not s.block_table for s in list(waiting)[1:])

    def teardown(self):
        if not hasattr(self, "scheduler"):
            return
        for _ in range(MAX_STEPS_TO_DRAIN):
            if self.scheduler.is_finished():
                break
            self.run_one_step(lambda: 1)  # never eos: ends by max_tokens or max_model_len
        assert self.scheduler.is_finished() and not self.live, "requests left unfinished"
        assert self.manager.num_free_blocks == self.manager.num_blocks


SchedulerMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=50, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
TestScheduler = SchedulerMachine.TestCase
