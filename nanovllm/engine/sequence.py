from enum import Enum, auto
from itertools import count

from nanovllm.sampling_params import SamplingParams


# Stands for a token that an in-flight decode step is sampling (asynchronous scheduling, llm_engine.py):
# the next step is scheduled before that token is known. Never reaches the model or the user.
PLACEHOLDER = -1


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One request: its tokens, where their K/V lives, and how far the model has computed it."""
    _ids = count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams, block_size: int,
                 sample_index: int = 0):
        self.seq_id = next(Sequence._ids)
        # Which of the request's n samples this is; seeded sampling mixes it into the noise.
        self.sample_index = sample_index
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.block_size = block_size
        self.sampling_params = sampling_params
        self.block_table: list[int] = []
        # Chained prefix-cache hashes of the full blocks, filled lazily by the block manager.
        self.block_hashes: list[int] = []
        # Tokens whose K/V is in the cache; the rest are computed by the next prefill chunk or decode.
        self.num_computed_tokens = 0
        # Prompt tokens served from the prefix cache at the first admission (reported to the user).
        self.num_cached_tokens = 0
        # Tokens this step computes (set by the scheduler, read by the model runner).
        self.num_scheduled_tokens = 0
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        # What stopped it: a stop string or a stop token id (None for eos, length or abort), as vLLM.
        self.stop_reason: str | int | None = None
        # Per generated token, {token_id: logprob} when sampling_params.logprobs is set.
        self.logprobs: list[dict[int, float]] = []
        # The last token is a PLACEHOLDER that the in-flight step will fill (asynchronous scheduling).
        self.has_placeholder = False

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def num_blocks(self) -> int:
        return (len(self) + self.block_size - 1) // self.block_size

    def block_tokens(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size:(i + 1) * self.block_size]

    def append_placeholder(self) -> None:
        """Count the token being sampled now, so the next step can be scheduled before it is known."""
        self.token_ids.append(PLACEHOLDER)
        self.has_placeholder = True

    def drop_placeholder(self) -> None:
        """The step that was to fill the placeholder will not (it failed or was interrupted)."""
        if self.has_placeholder:
            self.token_ids.pop()
            self.has_placeholder = False

    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        if self.has_placeholder:  # the token the placeholder stood for
            self.token_ids[-1] = token_id
            self.has_placeholder = False
        else:
            self.token_ids.append(token_id)
        if logprobs is not None:
            self.logprobs.append(logprobs)
