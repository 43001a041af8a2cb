"""Runners on this machine: one engine in this process, or N engine processes over shards of the input
(data parallel), each on its own GPU or group of tensor_parallel_size GPUs."""
import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Iterator

import torch

from nanovllm.batch.worker import Chunk, ChunkResult, EngineWorker

# Chunks queued per engine: one running, one waiting, so an engine never idles while the driver writes.
CHUNKS_PER_ENGINE = 2
POLL_SECONDS = 1.0
SHUTDOWN_SECONDS = 30.0


class LocalRunner:
    """One engine in the driver's own process."""

    def __init__(self, model: str, engine_options: dict):
        self.model, self.engine_options = model, engine_options

    def __enter__(self):
        self.worker = EngineWorker(self.model, self.engine_options)
        return self

    def results(self, chunks: Iterator[Chunk]) -> Iterator[ChunkResult]:
        for chunk in chunks:
            yield self.worker.process(chunk)

    def __exit__(self, *exc):
        self.worker.close()


def engine_placements(num_engines: int, engine_options: dict) -> list[dict]:
    """Per engine process: the GPUs it sees (CUDA_VISIBLE_DEVICES), or on CPU its share of the cores."""
    device = engine_options.get("device", "auto")
    tp = engine_options.get("tensor_parallel_size", 1)
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        if num_engines * tp > len(gpus):
            raise ValueError(f"data_parallel_size={num_engines} x tensor_parallel_size={tp} needs "
                             f"{num_engines * tp} GPUs; {len(gpus)} visible")
        return [{"gpus": ",".join(gpus[i * tp:(i + 1) * tp])} for i in range(num_engines)]
    # N engines each using every core would fight over them.
    return [{"threads": max(1, (os.cpu_count() or 1) // num_engines)}] * num_engines


def serve(rank: int, placement: dict, model: str, engine_options: dict, tasks, results) -> None:
    """An engine process: build the engine, then turn chunks into results until told to stop (None)."""
    try:
        if "gpus" in placement:
            os.environ["CUDA_VISIBLE_DEVICES"] = placement["gpus"]  # before anything touches CUDA
        else:
            torch.set_num_threads(placement["threads"])
        worker = EngineWorker(model, engine_options)
        results.put(("ready", rank, None))
        while (chunk := tasks.get()) is not None:
            results.put(("result", rank, worker.process(chunk)))
        worker.close()
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))


class DataParallelRunner:
    """N engine processes sharing one queue of chunks: a free engine takes the next chunk, so uneven chunks
    balance out. A dead engine stops the job; what was written stays, and a rerun resumes."""

    def __init__(self, model: str, engine_options: dict, num_engines: int):
        self.model, self.engine_options, self.num_engines = model, engine_options, num_engines

    def __enter__(self):
        placements = engine_placements(self.num_engines, self.engine_options)
        # spawn, not fork: a forked child would inherit the driver's threads and any CUDA state.
        context = mp.get_context("spawn")
        self.tasks, self.messages = context.Queue(), context.Queue()
        # Not daemonic: an engine with tensor_parallel_size > 1 starts processes of its own.
        self.processes = [context.Process(target=serve, name=f"nanovllm-batch-engine-{rank}",
                                          args=(rank, placement, self.model, self.engine_options,
                                                self.tasks, self.messages))
                          for rank, placement in enumerate(placements)]
        try:
            for process in self.processes:
                process.start()
            for _ in self.processes:
                self._next("ready")
        except BaseException:
            self._stop(graceful=False)
            raise
        return self

    def _next(self, expected: str):
        while True:
            try:
                kind, rank, payload = self.messages.get(timeout=POLL_SECONDS)
            except queue.Empty:
                dead = [(rank, p.exitcode) for rank, p in enumerate(self.processes) if p.exitcode is not None]
                if dead:
                    rank, code = dead[0]
                    raise RuntimeError(f"data-parallel engine {rank} exited (code {code}) while working; "
                                       f"the rows it held were not written. Rerun the same job to resume") from None
                continue
            if kind == "error":
                raise RuntimeError(f"data-parallel engine {rank} failed:\n{payload}")
            assert kind == expected, (kind, expected)
            return payload

    def results(self, chunks: Iterator[Chunk]) -> Iterator[ChunkResult]:
        chunks, in_flight = iter(chunks), 0
        while True:
            while in_flight < CHUNKS_PER_ENGINE * self.num_engines and (chunk := next(chunks, None)) is not None:
                self.tasks.put(chunk)
                in_flight += 1
            if in_flight == 0:
                return
            result = self._next("result")
            in_flight -= 1
            yield result

    def _stop(self, graceful: bool):
        """Graceful: the engines are idle and exit on their own. Otherwise (an error, Ctrl-C) the chunks they
        hold are lost anyway, so don't wait for them."""
        for _ in self.processes:
            self.tasks.put(None)
        for process in self.processes:
            if graceful and process.pid is not None:
                process.join(SHUTDOWN_SECONDS)
            if process.is_alive():
                process.terminate()
                process.join()

    def __exit__(self, exc_type, exc, tb):
        self._stop(graceful=exc_type is None)
