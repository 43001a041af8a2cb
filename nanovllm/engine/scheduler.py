"""Chooses each step's batch: prefill first (chunked to the token budget), else decode, preempting
the newest running sequences by recompute when the KV cache runs out."""
import logging
from collections import deque

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, block_manager: BlockManager,
                 eos_token_ids: tuple[int, ...], max_model_len: int):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_manager = block_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        # The head of `waiting` may be partly prefilled (chunked prefill): it holds blocks already.
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence, first: bool = False) -> None:
        """Queue seq; first=True puts it ahead of the waiting requests (n > 1 siblings of a request
        whose prompt was just computed, so they find its blocks still cached)."""
        if first and self.waiting and self.waiting[0].block_table:
            # A partly prefilled head keeps its place: it holds blocks and was admitted under
            # max_num_seqs; queued behind a sequence it could wait forever for those blocks.
            self.waiting.insert(1, seq)
        elif first:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns (sequences, is_prefill); each sequence's num_scheduled_tokens is set."""
        scheduled = self._schedule_prefill()
        if scheduled:
            return scheduled, True
        return self._schedule_decode(), False

    def _schedule_prefill(self) -> list[Sequence]:
        scheduled, budget = [], self.max_num_batched_tokens
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if not seq.block_table:
                # Every sequence scheduled so far this step is in `running` already (a partial chunk
                # ends the loop), so `running` alone counts the batch.
                if len(self.running) >= self.max_num_seqs:
                    break
                if not self.block_manager.can_allocate(seq):
                    break
                self.block_manager.allocate(seq)
            remaining = len(seq) - seq.num_computed_tokens
            seq.num_scheduled_tokens = min(remaining, budget)
            budget -= seq.num_scheduled_tokens
            scheduled.append(seq)
            if seq.num_scheduled_tokens < remaining:
                break  # the rest of this prompt goes in the next step's chunk
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        return scheduled

    def _schedule_decode(self) -> list[Sequence]:
        # One token per sequence: the token budget caps the batch too (it sizes the activation peak).
        scheduled, most = [], min(self.max_num_seqs, self.max_num_batched_tokens)
        block_size = self.block_manager.block_size
        while self.running and len(scheduled) < most:
            seq = self.running.popleft()
            # Most steps need no new block: the newest token still fits the last one (checked inline,
            # as this loop runs for every sequence of every decode step).
            if len(seq.token_ids) > len(seq.block_table) * block_size:
                while not self.block_manager.can_append(seq):
                    if self.running:
                        self._preempt(self.running.pop())
                    else:
                        self._preempt(seq)
                        break
                else:
                    self.block_manager.may_append(seq)
                if seq.status != SequenceStatus.RUNNING:  # it preempted itself
                    continue
            seq.num_scheduled_tokens = 1
            scheduled.append(seq)
        self.running.extendleft(reversed(scheduled))
        return scheduled

    def look_ahead(self, seqs: list[Sequence]) -> list[Sequence]:
        """The decode step after seqs' decode step, scheduled while that one still runs (asynchronous
        scheduling): seqs less those its token finishes by length, each counting the token it is
        sampling as a placeholder. [] when the next batch cannot be told before the tokens are known:
        requests wait (the next step may prefill them), not every running sequence ran, or the new
        tokens need more KV blocks than are free (the next step may preempt). A sequence that the
        unknown token finishes (eos, a stop) gets one wasted row in the next step."""
        if self.waiting or len(self.running) != len(seqs):
            return []
        block_size = self.block_manager.block_size
        # The next step writes K/V at position len(seq): a new block when that is a block boundary.
        following = [seq for seq in seqs if not self._reaches_length(seq, len(seq.token_ids) + 1)]
        opening = [seq for seq in following if len(seq.token_ids) == len(seq.block_table) * block_size]
        if not following or len(opening) > self.block_manager.num_free_blocks:
            return []
        # A row that the unknown token may end must not evict a cached prefix for its block, which
        # synchronous stepping would keep: then step synchronously.
        if len(opening) > self.block_manager.num_free_uncached_blocks and any(map(self._may_stop, opening)):
            return []
        for seq in following:
            seq.append_placeholder()
            self.block_manager.may_append(seq)
            seq.num_scheduled_tokens = 1
        return following

    def undo_prefill(self, seqs: list[Sequence]) -> None:
        """A prefill step that raised computed nothing: put the sequences it moved to `running` back at the
        head of `waiting`, in order and keeping their blocks, so they are prefilled again rather than
        decoded over K/V that was never written."""
        moved = [seq for seq in seqs if seq.status == SequenceStatus.RUNNING]
        moved_ids = {seq.seq_id for seq in moved}
        self.running = deque(seq for seq in self.running if seq.seq_id not in moved_ids)
        for seq in reversed(moved):
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)

    def _preempt(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)
        logger.debug("preempted sequence %d (%d tokens)", seq.seq_id, len(seq))

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop unfinished seqs from the queues and free their blocks."""
        dropped = {seq.seq_id for seq in seqs if not seq.is_finished}
        for seq in seqs:
            if seq.seq_id in dropped:
                self.block_manager.deallocate(seq)
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "abort"
        self.waiting = deque(s for s in self.waiting if s.seq_id not in dropped)
        self.running = deque(s for s in self.running if s.seq_id not in dropped)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int | None],
                    logprobs: list[dict[int, float] | None] | None = None) -> list[Sequence]:
        """Commit the step's K/V, append sampled tokens (None: prefill chunk not finished) and their
        logprobs, and return the sequences that finished. A row whose sequence finished while the
        step ran (a wasted row of a queued step) is skipped."""
        finished = []
        for i, (seq, token_id) in enumerate(zip(seqs, token_ids)):
            if seq.is_finished:  # finished while this step ran (asynchronous scheduling): a wasted row
                continue
            self.block_manager.commit_computed(seq, seq.num_scheduled_tokens)
            if token_id is None:
                continue
            seq.append_token(token_id, logprobs[i] if logprobs else None)
            reason, seq.stop_reason = self._finish_reason(seq, token_id)
            if reason:
                self._finish(seq, reason)
                finished.append(seq)
        if finished:  # one linear pass, not a deque.remove per finished sequence
            self.running = deque(seq for seq in self.running if not seq.is_finished)
        return finished

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED
        self.block_manager.deallocate(seq)

    def stop(self, seq: Sequence, stop_reason: str) -> bool:
        """Finish seq because its text reached the stop string stop_reason (the engine detokenizes).
        Returns whether this finished it (False: it had finished already, e.g. by length)."""
        newly = not seq.is_finished
        if newly:
            self._finish(seq, "stop")
            self.running = deque(s for s in self.running if s is not seq)
        seq.finish_reason, seq.stop_reason = "stop", stop_reason
        return newly

    def _finish_reason(self, seq: Sequence, token_id: int) -> tuple[str | None, int | None]:
        """(finish reason, stop reason). Before min_tokens neither eos nor stop_token_ids end a sequence
        (the sampler suppresses them too)."""
        params, num_tokens = seq.sampling_params, len(seq.token_ids)
        if num_tokens - seq.num_prompt_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return "stop", None
            if params.stop_token_ids and token_id in params.stop_token_ids:
                return "stop", token_id
        if self._reaches_length(seq, num_tokens):
            return "length", None
        return None, None

    @staticmethod
    def _may_stop(seq: Sequence) -> bool:
        """Whether a token can end seq before its length does (eos, a stop token or string)."""
        params = seq.sampling_params
        return not params.ignore_eos or bool(params.stop_token_ids) or bool(params.stop)

    def _reaches_length(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether seq is done by length once it holds num_tokens tokens."""
        return (num_tokens - seq.num_prompt_tokens >= seq.sampling_params.max_tokens
                or num_tokens >= self.max_model_len)
