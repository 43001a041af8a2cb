"""Rank 0's side of tensor parallelism: spawns one process per rank > 0, sends each of them every
step, notices within moments when one dies, and shuts them all down.

Failure model: the ranks must run the same collectives in the same order. Anything that stops rank 0
in the middle of a step (an error, a dead worker) leaves them out of step, so the pool shuts the
workers down and the engine raises; a Ctrl-C that arrives during a step waits until the step is done,
so an interrupted `generate` leaves every rank in step and the engine usable.
"""
import atexit
import logging
import signal
import threading
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from multiprocessing import Pipe
from multiprocessing.connection import wait

import torch
import torch.multiprocessing

from nanovllm.config import Config
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.tp_channel import CallChannel, WorkerGone
from nanovllm.engine.tp_step import StepEncoder
from nanovllm.engine.tp_worker import EXIT, cpu_threads_per_rank, end_group, rank_device, run_worker
from nanovllm.sampling.shard_draw import ShardDraw
from nanovllm.utils.distributed import ParallelGroup, create_group, open_store

logger = logging.getLogger(__name__)

# How long a worker gets to exit after EXIT before it is killed.
EXIT_TIMEOUT_S = 10.0
# How long close() waits for the watchdog. Seen on 2 x H100: NCCL's abort, called by the watchdog when
# a worker died, did not return while kernels waited on the dead rank; the engine must still report.
WATCHDOG_JOIN_S = 5.0

_open_pools: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


@atexit.register
def _close_open_pools() -> None:
    # Registered after multiprocessing's own exit hook (imported above), so it runs before it: that
    # hook joins every non-daemon child, and a worker never told to exit would make it wait forever.
    for pool in list(_open_pools):
        pool.close()


@contextmanager
def interrupts_deferred():
    """Hold back Ctrl-C (SIGINT) until the block ends, then deliver it to the handler in place.
    Only the main thread can handle signals; elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # (None: a handler installed outside Python, which Python cannot reinstall)
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)


class WorkerPool:
    def __init__(self, config: Config):
        world = config.tensor_parallel_size
        self.closed = False
        self.failure: str | None = None  # why the workers are gone, once they are
        self.processes = []
        self.channel = CallChannel(world - 1)
        self.encoder = StepEncoder()
        self._watchdog: threading.Thread | None = None
        self._stop_watchdog = None
        self._threads_before: int | None = None
        self._reaping = threading.Lock()  # the watchdog and the engine's thread both reap workers
        # Rank 0's model runner (weakly: the pool must not keep the engine alive), whose CUDA graphs
        # close() frees before the group shuts down.
        self.rank0_runner: Callable[[], object] = lambda: None
        _open_pools.add(self)
        try:
            store = open_store(0, world)
            context = torch.multiprocessing.get_context("spawn")
            for rank, endpoint in enumerate(self.channel.endpoints, start=1):
                process = context.Process(target=run_worker, args=(rank, config, store.port, endpoint,
                                                logging.getLogger("nanovllm").getEffectiveLevel()),
                                          name=f"nanovllm-tp-rank{rank}")
                process.start()
                self.processes.append(process)
            self.channel.release_worker_ends()
            self.channel.wait_for_attach()
            self.device = rank_device(config, 0)
            if self.device.type == "cpu":  # rank 0 takes its share of the cores too, until close()
                self._threads_before = torch.get_num_threads()
                torch.set_num_threads(cpu_threads_per_rank(world))
            self.group: ParallelGroup = create_group(store, 0, world, self.device)
            self._start_watchdog()
            logger.info("tensor parallelism: %d ranks on %s (%s), worker pids %s", world, self.device.type,
                        "nccl" if self.device.type == "cuda" else "gloo", [p.pid for p in self.processes])
        except BaseException as error:
            self._fail(error)

    # ---- running things on every rank ---------------------------------------------------------
    @contextmanager
    def lockstep(self):
        """Rank 0's side of work every rank does together (building the model, a step). If it fails,
        the ranks are out of step: the workers are shut down and the error re-raised, as a
        RuntimeError naming the worker when one died."""
        self.check_open()
        try:
            yield
        except BaseException as error:
            self._fail(error)
        if self.failure is not None:  # the watchdog aborted the group under a running step
            self.close(graceful=False)
            raise RuntimeError(self.failure)

    def run_step(self, seqs: list[Sequence], is_prefill: bool, draw: ShardDraw | None, run_rank0: Callable):
        """Send the step (and rank 0's plan for its draw) to the workers, then run rank 0's part:
        returns run_rank0()."""
        with interrupts_deferred(), self.lockstep():
            self.channel.send(self.encoder.encode(seqs, is_prefill, draw))
            return run_rank0()

    def read_step(self, read: Callable):
        """Rank 0 waits for a step's results: returns read(). A collective that failed (a worker
        died) shows here; Ctrl-C waits until the step has ended."""
        with interrupts_deferred(), self.lockstep():
            return read()

    def check_open(self) -> None:
        if self.failure is not None:  # a worker died since the last step
            self.close(graceful=False)
            raise RuntimeError(self.failure)
        if self.closed:
            raise RuntimeError("the tensor-parallel workers were shut down (exit() was called); create a new LLM")

    # ---- failures -----------------------------------------------------------------------------
    def _dead_worker(self, timeout: float) -> str | None:
        """A message naming a worker that has exited, waiting up to timeout for one to."""
        exited = wait([p.sentinel for p in self.processes], timeout)
        for rank, process in enumerate(self.processes, start=1):
            if process.sentinel in exited:
                with self._reaping:
                    process.join()
                    code = process.exitcode
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                hint = "" if self.channel.attached else (
                    " while starting (a script must create a tensor-parallel LLM under "
                    "`if __name__ == \"__main__\":`: the workers are spawned and import the main module)")
                return (f"tensor-parallel worker rank {rank} (pid {process.pid}) {how}{hint}; the engine is shut "
                        f"down (see the worker's output above for its error)")
        return None

    def _fail(self, error: BaseException):
        # A closed pipe (WorkerGone) or a failed collective (RuntimeError) is often the first sign of
        # a worker's death: give it a moment to be reaped. Other errors are rank 0's own.
        dead = None
        if isinstance(error, (WorkerGone, RuntimeError)):
            dead = self.failure or self._dead_worker(timeout=2.0)
        self.failure = dead or f"the tensor-parallel engine was shut down after {type(error).__name__} in a step"
        self.close(graceful=False)
        if dead:
            raise RuntimeError(dead) from error
        raise error

    def _start_watchdog(self) -> None:
        stop_reader, self._stop_watchdog = Pipe(duplex=False)
        self._watchdog = threading.Thread(target=self._watch, args=(stop_reader,), daemon=True,
                                          name="nanovllm-tp-watchdog")
        self._watchdog.start()

    def _watch(self, stop_reader) -> None:
        ready = wait([stop_reader] + [p.sentinel for p in self.processes])
        if stop_reader in ready:
            return
        self.failure = self._dead_worker(timeout=0)
        logger.error("%s", self.failure)
        if self.device.type == "cuda":
            # A NCCL collective or a peer all-reduce would wait for the dead rank until its timeout;
            # aborting the group ends them now (gloo notices the closed socket by itself).
            self.group.abort()

    # ---- shutdown -----------------------------------------------------------------------------
    def close(self, graceful: bool = True) -> None:
        """Stop the workers and free the channel. Graceful: tell them to exit and wait; otherwise
        (the ranks may be out of step) kill them. Idempotent."""
        if self.closed:
            return
        self.closed = True
        _open_pools.discard(self)
        graceful = graceful and self.failure is None
        aborting = False  # the watchdog is still aborting the group: leave the group and graphs alone
        if self._watchdog is not None:  # first, so that workers exiting now are not reported as deaths
            self._stop_watchdog.close()
            self._watchdog.join(WATCHDOG_JOIN_S)
            aborting = self._watchdog.is_alive()
            if aborting:
                logger.error("the process group's abort has not returned in %.0f s; leaving it (this "
                             "engine's GPU memory is freed when the process exits)", WATCHDOG_JOIN_S)
        if graceful:
            try:
                self.channel.send(EXIT)
            except WorkerGone:
                pass
        group = getattr(self, "group", None)
        if group is not None and not aborting:
            end_group(group, self.rank0_runner(), self.device, graceful)
        for process in self.processes:
            process.join(EXIT_TIMEOUT_S if graceful else 0)
            if process.is_alive():
                process.kill()
                process.join()
            process.close()
        self.channel.close()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
