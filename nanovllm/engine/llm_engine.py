"""Request intake, the step loop, detokenization and outputs."""
import logging
import time
from collections.abc import Sequence as SequenceABC

from tqdm.auto import tqdm
from transformers import AutoTokenizer

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class LLMEngine:
    def __init__(self, model: str, **kwargs):
        unknown = set(kwargs) - Config.field_names()
        if unknown:
            raise TypeError(f"unknown LLM argument(s) {sorted(unknown)}; allowed: {sorted(Config.field_names())}")
        self.config = config = Config(model, **kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.model_runner = ModelRunner(config)
        self.block_manager = BlockManager(self.model_runner.num_kvcache_blocks, config.kvcache_block_size)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens, self.block_manager,
                                   config.eos_token_ids, config.max_model_len)

    # ---- intake -------------------------------------------------------------------------------
    def _tokenize(self, prompt, index: int) -> list[int]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
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

    def make_sequences(self, prompts, sampling_params) -> list[Sequence]:
        """Validate a whole call before any of it is queued, so a bad request changes nothing."""
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
        seqs = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            token_ids = self._tokenize(prompt, i)
            self._check_fits_cache(len(token_ids), params, i)
            seqs.append(Sequence(token_ids, params, self.config.kvcache_block_size))
        return seqs

    # ---- the loop -----------------------------------------------------------------------------
    def step(self) -> tuple[list[Sequence], int, bool]:
        """Run one batch. Returns (finished sequences, tokens processed, is_prefill)."""
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            raise RuntimeError("scheduler found nothing to run although requests are pending")
        token_ids = self.model_runner.run(seqs, is_prefill)
        num_tokens = sum(seq.num_scheduled_tokens for seq in seqs)
        return self.scheduler.postprocess(seqs, token_ids), num_tokens, is_prefill

    def is_finished(self) -> bool:
        return self.scheduler.is_finished()

    def output(self, seq: Sequence) -> dict:
        return {
            "text": self.tokenizer.decode(seq.completion_token_ids, skip_special_tokens=True),
            "token_ids": seq.completion_token_ids,
            "prompt_token_ids": seq.prompt_token_ids,
            "finish_reason": seq.finish_reason,
            "num_cached_tokens": seq.num_cached_tokens,
        }

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] = None,
                 use_tqdm: bool = True) -> list[dict]:
        """Generate completions for prompts; one output dict per prompt, in prompt order."""
        if sampling_params is None:
            sampling_params = SamplingParams()
        seqs = self.make_sequences(prompts, sampling_params)
        for seq in seqs:
            self.scheduler.add(seq)
        progress = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        try:
            while not self.scheduler.is_finished():
                start = time.perf_counter()
                finished, num_tokens, is_prefill = self.step()
                rate = num_tokens / max(time.perf_counter() - start, 1e-9)
                progress.set_postfix_str(f"{'prefill' if is_prefill else 'decode'} {rate:.0f} tok/s, "
                                         f"preemptions {self.scheduler.num_preemptions}", refresh=False)
                progress.update(len(finished))
        except BaseException:
            # Interrupted (Ctrl-C) or failed: drop this call's requests so the engine stays usable.
            self.scheduler.abort(seqs)
            raise
        finally:
            progress.close()
        return [self.output(seq) for seq in seqs]
