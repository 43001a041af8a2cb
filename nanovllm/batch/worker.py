"""One engine that turns a chunk of requests into output rows; every runner (in-process, data-parallel
processes, Ray actors) wraps this same worker, which is why their results agree."""
import os
from dataclasses import dataclass, field

from jinja2 import TemplateError

from nanovllm import LLM
from nanovllm.batch.requests import Request, RowError
from nanovllm.engine.chat import conversations_to_prompts

# Fault injection for tests of crash recovery: "<input position>:<marker file>" makes the process that
# generated the chunk holding that row exit abruptly before handing it back, once (the marker says it did).
CRASH_ENV = "NANOVLLM_BATCH_CRASH_AT"


@dataclass
class Chunk:
    requests: list[Request]


@dataclass
class ChunkResult:
    num_requests: int
    rows: list[dict] = field(default_factory=list)
    first_position: int | None = None  # input position of rows[0], which names the part file
    errors: list[RowError] = field(default_factory=list)

    @property
    def num_completion_tokens(self) -> int:
        return sum(row["num_completion_tokens"] for row in self.rows)


def output_row(request: Request, output: dict) -> dict:
    """The id, everything generate returned except the echoed prompt (and "outputs", which repeats the
    top-level fields when there is one sample), and the token counts, all samples' together."""
    samples = output.get("outputs", [output])
    dropped = {"prompt_token_ids"} | ({"outputs"} if len(samples) == 1 else set())
    row = {"id": request.id}
    row.update((key, value) for key, value in output.items() if key not in dropped)
    row["num_prompt_tokens"] = len(output["prompt_token_ids"])
    row["num_completion_tokens"] = sum(len(sample["token_ids"]) for sample in samples)
    return row


def row_message(error: Exception) -> str:
    """The engine names the call's arguments (prompts[0], sampling_params[0]); here a call is one row."""
    return str(error).replace("sampling_params[0].", "").replace("prompts[0]", "the prompt")


def crash_if_injected(chunk: Chunk) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    position, marker = spec.split(":", 1)
    if any(r.line == int(position) for r in chunk.requests) and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)


class EngineWorker:
    def __init__(self, model: str, engine_options: dict):
        self.llm = LLM(model, **engine_options)

    def close(self) -> None:
        """Free the engine's memory (and its tensor-parallel processes) now, not whenever it is collected."""
        self.llm.exit()

    def prompt_of(self, request: Request):
        if request.messages is None:
            return request.prompt
        # The chat template as LLM.chat applies it; rows of every kind then share one generate call.
        [token_ids] = conversations_to_prompts(self.llm.tokenizer, request.messages, None)
        return token_ids

    def prompt_token_ids(self, request: Request) -> list[int]:
        """Tokenize and run the engine's own request checks (vocabulary, length, cache size) one row at a time,
        so a bad row is reported alone instead of failing its whole chunk."""
        try:
            seqs = self.llm.make_sequences([self.prompt_of(request)], request.sampling_params)
        except (TypeError, ValueError, TemplateError) as e:
            raise ValueError(row_message(e)) from None
        return seqs[0].prompt_token_ids

    def process(self, chunk: Chunk) -> ChunkResult:
        result = ChunkResult(num_requests=len(chunk.requests))
        runnable, prompts = [], []
        for request in chunk.requests:
            try:
                prompts.append(self.prompt_token_ids(request))
            except ValueError as e:
                result.errors.append(RowError(request.line, request.id, str(e)))
                continue
            runnable.append(request)
        if runnable:
            outputs = self.llm.generate(prompts, [r.sampling_params for r in runnable], use_tqdm=False)
            result.rows = [output_row(r, o) for r, o in zip(runnable, outputs)]
            result.first_position = runnable[0].line
        crash_if_injected(chunk)
        return result
