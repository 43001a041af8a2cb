"""Request intake, the step loop, detokenization and outputs."""
import logging
import time
import weakref
from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC
from contextlib import closing
from itertools import chain

from tqdm.auto import tqdm
from transformers import AutoTokenizer

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.chat import conversations_to_prompts
from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.model_runner import ModelRunner, StepOutput
from nanovllm.engine.request import Request
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.tp_pool import WorkerPool
from nanovllm.sampling_params import SamplingParams, check_type

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class LLMEngine:
    def __init__(self, model: str, **kwargs):
        unknown = set(kwargs) - Config.field_names()
        if unknown:
            raise TypeError(f"unknown LLM argument(s) {sorted(unknown)}; allowed: {sorted(Config.field_names())}")
        self.config = config = Config(model, **kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model, trust_remote_code=False)
        # Ranks 1.. of tensor parallelism, each in its own process; rank 0 runs here. None at one rank.
        self.workers = WorkerPool(config) if config.tensor_parallel_size > 1 else None
        if self.workers is None:
            self.model_runner = ModelRunner(config)
        else:
            with self.workers.lockstep():
                self.model_runner = ModelRunner(config, self.workers.group)
            self.workers.rank0_runner = weakref.ref(self.model_runner)
        self.block_manager = BlockManager(self.model_runner.num_kvcache_blocks, config.kvcache_block_size)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens, self.block_manager,
                                   config.eos_token_ids, config.max_model_len)
        # n > 1: a request's other samples wait here until its first has computed (and cached) the prompt.
        self.waiting_siblings: dict[int, list[Sequence]] = {}
        # seq_id -> the detokenizer of a running sequence that streams or has stop strings.
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}
        # The decode step queued while the previous one ran (asynchronous scheduling), not yet read.
        self.in_flight: tuple[list[Sequence], StepOutput] | None = None
        self.async_scheduling = config.async_scheduling

    # ---- intake -------------------------------------------------------------------------------
    def _tokenize(self, prompt, index: int) -> list[int]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list):
            for j, t in enumerate(prompt):
                if isinstance(t, bool) or not isinstance(t, int):
                    raise TypeError(f"prompts[{index}][{j}] must be an int token id, got {type(t).__name__} {t!r}")
            token_ids = prompt
        else:
            raise TypeError(f"prompts[{index}] must be a str or a list of int token ids, got {type(prompt).__name__}")
        vocab_size = self.config.hf_config.vocab_size
        if not token_ids:
            raise ValueError(f"prompts[{index}] is empty; a prompt needs at least one token")
        bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompts[{index}] has token id {bad}, outside the vocabulary [0, {vocab_size})")
        if len(token_ids) >= self.config.max_model_len:
            raise ValueError(f"prompts[{index}] has {len(token_ids)} tokens; max_model_len={self.config.max_model_len} "
                             f"allows at most {self.config.max_model_len - 1} so one token can be generated")
        return token_ids

    def _check_fits_cache(self, num_prompt_tokens: int, params: SamplingParams, index: int) -> None:
        # A sequence that cannot fit the whole cache alone would be preempted forever.
        most_tokens = min(num_prompt_tokens + params.max_tokens, self.config.max_model_len)
        block_size = self.config.kvcache_block_size
        needed = -(-most_tokens // block_size)
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"prompts[{index}] needs up to {most_tokens} tokens ({needed} KV blocks of {block_size}), but the "
                f"KV cache holds only {self.block_manager.num_blocks} blocks; lower max_tokens or give the cache "
                f"more memory (gpu_memory_utilization / num_kvcache_blocks)")

    def _check_sampling_params(self, params: SamplingParams, index: int) -> None:
        """The checks SamplingParams cannot do alone: those against the model's vocabulary."""
        vocab_size = self.config.hf_config.vocab_size
        bad = next((t for t in params.stop_token_ids or () if t >= vocab_size), None)
        if bad is not None:
            raise ValueError(f"sampling_params[{index}].stop_token_ids has {bad}, outside the vocabulary "
                             f"[0, {vocab_size})")
        if params.logprobs is not None and params.logprobs > vocab_size:
            raise ValueError(f"sampling_params[{index}].logprobs={params.logprobs} exceeds the vocabulary "
                             f"size {vocab_size}")

    def make_sequences(self, prompts, sampling_params) -> list[Sequence]:
        """Validate a whole call and return its sequences (all n samples of each prompt), unqueued."""
        return [seq for request in self.make_requests(prompts, sampling_params) for seq in request.seqs]

    def make_requests(self, prompts, sampling_params, incremental: bool = False) -> list[Request]:
        """Validate a whole call before any of it is queued, so a bad request changes nothing.
        incremental: detokenize every sample step by step (for streaming)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, list):
            raise TypeError(f"prompts must be a str, a list of token ids, or a list of those; "
                            f"got {type(prompts).__name__}")
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        elif not (isinstance(sampling_params, SequenceABC)
                  and all(isinstance(p, SamplingParams) for p in sampling_params)):
            raise TypeError("sampling_params must be a SamplingParams or a list of them")
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts; "
                             f"pass one SamplingParams or one per prompt")
        requests = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            token_ids = self._tokenize(prompt, i)
            self._check_sampling_params(params, i)
            self._check_fits_cache(len(token_ids), params, i)
            seqs = [Sequence(token_ids, params, self.config.kvcache_block_size, sample_index=j)
                    for j in range(params.n)]
            requests.append(Request(i, seqs, self.tokenizer, incremental))
        return requests

    # ---- the loop -----------------------------------------------------------------------------
    def step(self) -> tuple[list[Sequence], int, bool]:
        """Run one batch. Returns (finished sequences, tokens processed, is_prefill).

        Asynchronous scheduling: a decode step's successor is scheduled and queued on the device
        before the step's tokens are read, so the device never waits for the host's bookkeeping
        (reading the tokens, finishing sequences, scheduling). The successor counts each token being
        sampled as a placeholder that the read replaces; its input ids come from the sampled ids on
        the device. A sequence that the read finishes (eos, a stop) wastes its row of the successor."""
        seqs, output = self._take_in_flight()
        is_prefill = False
        if seqs is None:
            seqs, is_prefill = self.scheduler.schedule()
            if not seqs:
                raise RuntimeError("scheduler found nothing to run although requests are pending")
        try:
            if output is None:
                output = self._launch(seqs, is_prefill)
            if self.async_scheduling and not is_prefill:
                following = self.scheduler.look_ahead(seqs)
                if following:
                    self.in_flight = following, self._launch(following, False)
            token_ids, logprobs = output.read() if self.workers is None else self.workers.read_step(output.read)
        except BaseException:
            # Nothing of a failed step was committed on the host (a prefill is redone; the state the
            # runner carries over on the device is checked against the sequences' lengths next step).
            self._drop_in_flight(seqs)
            if is_prefill:
                self.scheduler.undo_prefill(seqs)
            raise
        try:
            num_tokens = sum(seq.num_scheduled_tokens for seq in seqs)
            finished = self.scheduler.postprocess(seqs, token_ids, logprobs)
            return finished + self._after_sampling(seqs, token_ids), num_tokens, is_prefill
        except BaseException:  # interrupted while committing: some tokens were, the rest are lost
            self._drop_in_flight(seqs)
            raise

    def _drop_in_flight(self, seqs: list[Sequence]) -> None:
        """Forget the queued successor of seqs' step and the placeholders it left in them (those
        its read did not replace): its tokens would follow ones that were lost."""
        self.in_flight = None
        for seq in seqs:
            seq.drop_placeholder()

    def _take_in_flight(self) -> tuple[list[Sequence] | None, StepOutput | None]:
        """The queued decode step, unless every sequence in it has finished since (aborted, or the
        last step finished them): then it is dropped, its work on the device wasted."""
        in_flight, self.in_flight = self.in_flight, None
        if in_flight is None or all(seq.is_finished for seq in in_flight[0]):
            return None, None
        return in_flight

    def _launch(self, seqs: list[Sequence], is_prefill: bool) -> StepOutput:
        if self.workers is None:
            return self.model_runner.run(seqs, is_prefill)
        # The workers get the step first, so they compute while rank 0 does.
        draw, settings = self.model_runner.plan_draw(seqs, is_prefill)
        return self.workers.run_step(seqs, is_prefill, draw,
                                     lambda: self.model_runner.run(seqs, is_prefill, draw, settings))

    def _after_sampling(self, seqs: list[Sequence], token_ids: list[int | None]) -> list[Sequence]:
        """Admit the siblings of requests whose prompt is now cached; detokenize the sequences that
        stream or have stop strings. Returns the sequences a stop string finished."""
        stopped = []
        for seq, token_id in zip(seqs, token_ids):
            if token_id is None:
                continue
            for sibling in reversed(self.waiting_siblings.pop(seq.seq_id, [])):
                self.scheduler.add(sibling, first=True)
            detokenizer = self.detokenizers.get(seq.seq_id)
            if detokenizer is None:
                continue
            stop = detokenizer.update(seq.token_ids, seq.is_finished)
            if stop is not None and self.scheduler.stop(seq, stop):
                stopped.append(seq)
            if seq.is_finished:
                del self.detokenizers[seq.seq_id]
        return stopped

    def is_finished(self) -> bool:
        return self.scheduler.is_finished()

    def _queue(self, requests: list[Request]) -> None:
        for request in requests:
            first, *siblings = request.seqs
            self.scheduler.add(first)
            if siblings:
                self.waiting_siblings[first.seq_id] = siblings
            for seq, detokenizer in zip(request.seqs, request.detokenizers):
                if detokenizer is not None:
                    self.detokenizers[seq.seq_id] = detokenizer

    def _drop(self, requests: list[Request]) -> None:
        seqs = [seq for request in requests for seq in request.seqs]
        self.scheduler.abort(seqs)
        for seq in seqs:
            self.waiting_siblings.pop(seq.seq_id, None)
            self.detokenizers.pop(seq.seq_id, None)

    def _run(self, requests: list[Request], use_tqdm: bool) -> Iterator[None]:
        """Queue requests and step until the engine is idle, yielding each step's finished sequences."""
        self._queue(requests)
        progress = tqdm(total=sum(len(r.seqs) for r in requests), desc="Generating", dynamic_ncols=True,
                        disable=not use_tqdm)
        try:
            while not self.scheduler.is_finished():
                start = time.perf_counter()
                finished, num_tokens, is_prefill = self.step()
                rate = num_tokens / max(time.perf_counter() - start, 1e-9)
                progress.set_postfix_str(f"{'prefill' if is_prefill else 'decode'} {rate:.0f} tok/s, "
                                         f"preemptions {self.scheduler.num_preemptions}", refresh=False)
                progress.update(len(finished))
                yield finished
        except BaseException:
            # Interrupted (Ctrl-C), failed, or a stream closed early: drop this call's requests so the
            # engine stays usable.
            self._drop(requests)
            raise
        finally:
            progress.close()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] = None,
                 use_tqdm: bool = True) -> list[dict]:
        """Generate completions for prompts; one output dict per prompt, in prompt order (README: Quick start)."""
        if sampling_params is None:
            sampling_params = SamplingParams()
        check_type("use_tqdm", use_tqdm, bool, "a bool")
        requests = self.make_requests(prompts, sampling_params)
        for _ in self._run(requests, use_tqdm):
            pass
        return [request.output() for request in requests]

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] = None,
             use_tqdm: bool = True, chat_template_kwargs: dict | None = None) -> list[dict]:
        """generate() for one conversation (a list of {"role", "content"} dicts) or a list of them, each
        rendered with the tokenizer's chat template and the assistant's generation prompt."""
        prompts = conversations_to_prompts(self.tokenizer, messages, chat_template_kwargs)
        return self.generate(prompts, sampling_params, use_tqdm)

    def stream(self, prompts, sampling_params: SamplingParams | list[SamplingParams] = None) -> Iterator[dict]:
        """Like generate, but yields each sample's new text and token ids as they are produced:
        {"index", "sample_index", "text", "token_ids", "logprobs", "finished", "finish_reason",
        "stop_reason"}; a sample's last event has finished=True. The call is validated here, before
        iteration; closing the iterator early drops its requests."""
        if sampling_params is None:
            sampling_params = SamplingParams()
        return self._stream(self.make_requests(prompts, sampling_params, incremental=True))

    def _stream(self, requests: list[Request]) -> Iterator[dict]:
        # closing(): if the caller stops early, the step loop is closed at once and drops the requests.
        owner = {seq.seq_id: request for request in requests for seq in request.seqs}
        with closing(self._run(requests, use_tqdm=False)) as steps:
            for finished in steps:
                # Only requests that ran this step can have news: visiting every request of a large call
                # each step would cost more than the step itself.
                touched = {}
                for seq in chain(self.scheduler.running, finished):
                    request = owner.get(seq.seq_id)
                    if request is not None:
                        touched[request.index] = request
                for request in touched.values():
                    yield from request.stream_events()
        for request in requests:  # anything finished by another call's steps in the meantime
            yield from request.stream_events()
