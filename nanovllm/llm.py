"""The public entry point and its lifecycle."""
import weakref

import torch

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.utils.collector import freeze_survivors, thaw_and_collect


class _ClosedRunner:
    """Stands in for the model runner after exit(), so that any later use says why it fails."""

    def __getattr__(self, name):
        raise RuntimeError("this LLM was shut down by exit(); create a new LLM to generate again")


def _free_unreferenced_device_memory() -> None:
    # Model modules hold reference cycles (parameters point back at their layer's weight_loader),
    # so a dropped engine's weights wait for the garbage collector (frozen ones until thawed:
    # utils/collector.py); the CUDA caching allocator then keeps their memory until emptied. Both
    # must happen before a new engine measures free memory.
    thaw_and_collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # cuBLAS keeps a workspace per stream the engine ran matmuls on (32 MiB each on Hopper; the
        # CUDA graphs' capture stream is one), allocated from the caching allocator; the next
        # matmul allocates it again.
        clear_cublas_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_cublas_workspaces is not None:
            clear_cublas_workspaces()
        torch.cuda.empty_cache()


class LLM(LLMEngine):
    """The public entry point: `LLM(model_dir, **config).generate(prompts, sampling_params)`.

    An LLM holds device memory and, with tensor_parallel_size > 1, one worker process per extra rank.
    `llm.exit()` or leaving `with LLM(...) as llm:` frees them at once. A dropped LLM's workers stop
    when it is garbage collected or the interpreter exits; its memory returns at the next LLM's
    start-up (or any exit()), since the objects alive after start-up are frozen out of the garbage
    collector (utils/collector.py).
    """

    def __init__(self, model: str, **kwargs):
        _free_unreferenced_device_memory()
        try:
            super().__init__(model, **kwargs)
        except BaseException:
            self.exit()  # whatever was built before the error: worker processes above all
            raise
        # Shuts the workers down if the LLM is dropped without exit(), or at interpreter exit; it holds
        # the pool, never the LLM, so it does not keep the LLM alive.
        self._finalizer = weakref.finalize(self, self.workers.close) if self.workers is not None else None
        freeze_survivors()  # no full collection walks the engine mid-run

    def exit(self) -> None:
        """Shut down the worker processes and free the weights, KV cache and CUDA graphs of every
        rank. Idempotent; the LLM cannot generate afterwards."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()
        workers = getattr(self, "workers", None)
        if workers is not None:
            workers.close()
        self.model_runner = _ClosedRunner()
        _free_unreferenced_device_memory()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info) -> None:
        self.exit()
