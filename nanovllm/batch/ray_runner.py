"""The same job on a Ray cluster: one engine per Ray actor, holding the GPUs it needs.

The driver reads the input, sends chunks to the actors and writes every result itself, so whatever Ray
retries, each row is written once. An actor whose process dies is restarted by Ray (its engine is built
again) and the chunks it held are resubmitted to it.
"""
from collections.abc import Iterator

from nanovllm.batch.parallel import CHUNKS_PER_ENGINE
from nanovllm.batch.worker import Chunk, ChunkResult, EngineWorker

# How often Ray may rebuild a dead actor and rerun its chunks before the job gives up (and can be resumed).
MAX_RESTARTS = 3


class EngineActor:
    def __init__(self, model: str, engine_options: dict):
        self.worker = EngineWorker(model, engine_options)

    def ready(self) -> bool:
        return True

    def process(self, chunk: Chunk) -> ChunkResult:
        return self.worker.process(chunk)


def gpus_per_engine(ray, engine_options: dict) -> int:
    device = engine_options.get("device", "auto")
    if device == "cpu" or (device == "auto" and not ray.cluster_resources().get("GPU", 0)):
        return 0
    return engine_options.get("tensor_parallel_size", 1)


class RayRunner:
    def __init__(self, model: str, engine_options: dict, num_engines: int, address: str | None):
        self.model, self.engine_options, self.num_engines, self.address = model, engine_options, num_engines, address

    def __enter__(self):
        import ray
        self.ray = ray
        # Join the caller's Ray session if it has one; else connect (address None: RAY_ADDRESS, then a cluster
        # started with `ray start` on this machine, else a new local one) and disconnect when done.
        self.owns_session = not ray.is_initialized()
        if self.owns_session:
            ray.init(address=self.address)
        actor_class = ray.remote(EngineActor).options(
            num_cpus=1, num_gpus=gpus_per_engine(ray, self.engine_options),
            max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
        self.actors = [actor_class.remote(self.model, self.engine_options) for _ in range(self.num_engines)]
        try:
            ray.get([actor.ready.remote() for actor in self.actors])  # engine start-up errors surface here
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def results(self, chunks: Iterator[Chunk]) -> Iterator[ChunkResult]:
        chunks = iter(chunks)
        pending = {}  # result ref -> the actor running it
        load = {id(actor): 0 for actor in self.actors}

        def submit(actor) -> None:
            while load[id(actor)] < CHUNKS_PER_ENGINE and (chunk := next(chunks, None)) is not None:
                pending[actor.process.remote(chunk)] = actor
                load[id(actor)] += 1

        for actor in self.actors:
            submit(actor)
        while pending:
            [ref], _ = self.ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ref)
            load[id(actor)] -= 1
            yield self.ray.get(ref)
            submit(actor)

    def __exit__(self, exc_type, exc, tb):
        for actor in self.actors:
            self.ray.kill(actor)
        if self.owns_session:
            self.ray.shutdown()
