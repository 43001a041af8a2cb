"""A tensor-parallel worker: the process of one rank > 0. It builds its shard of the model and then
runs every step rank 0 sends, taking part in the step's collectives; rank 0 alone samples."""
import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing.connection import wait

import torch

from nanovllm.config import Config
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.tp_channel import ChannelEndpoint
from nanovllm.engine.tp_step import SequenceMirror, StepCall
from nanovllm.utils.collector import freeze_survivors
from nanovllm.utils.distributed import ParallelGroup, create_group, open_store

logger = logging.getLogger(__name__)

EXIT = "exit"  # the message that ends a worker; everything else is a StepCall


def rank_device(config: Config, rank: int) -> torch.device:
    """One GPU per rank on CUDA (cuda:rank, as ModelRunner places it); elsewhere the one device."""
    return torch.device(config.device, rank if config.device == "cuda" else None)


def cpu_threads_per_rank(world_size: int) -> int:
    """CPU ranks share the host's cores. Each one's intra-op threads spin while waiting, so more
    threads than cores in total makes every collective wait for a descheduled peer (~10x slower)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // world_size)


def exit_with_rank0() -> None:
    """A rank 0 killed outright (SIGKILL) cannot tell its workers, and one waiting in a collective
    would wait until the collective's timeout: watch the parent process and exit with it."""
    parent = multiprocessing.parent_process()

    def watch():
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="nanovllm-rank0-watch").start()


def log_like_rank0(rank: int, level: int) -> None:
    """A spawned process starts with no logging set up: show this package's records at rank 0's
    level, marked with the rank."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(levelname)s %(name)s [rank {rank}]: %(message)s"))
    package = logging.getLogger("nanovllm")
    package.setLevel(level)
    package.addHandler(handler)


def end_group(group: ParallelGroup, runner: ModelRunner | None, device: torch.device, graceful: bool) -> None:
    """End a rank's part of the group. Graceful: pending collectives drain, then shut down; otherwise
    abort, as the peers may never join. runner: its CUDA graphs are freed first, since NCCL's
    shutdown waits for graphs that captured its collectives."""
    if runner is not None:
        runner.release_graphs()
    if graceful:
        group.shutdown(device)
    else:
        group.abort()


def run_worker(rank: int, config: Config, store_port: int, channel: ChannelEndpoint, log_level: int) -> None:
    """The worker process's entry point. Returns (the process exits) when rank 0 sends EXIT or is gone."""
    log_like_rank0(rank, log_level)
    # Ctrl-C in a terminal reaches every process in the foreground group; rank 0 alone decides what
    # it means, and a worker dying mid-collective would take the engine down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_rank0()
    channel.attach()
    device = rank_device(config, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cpu_threads_per_rank(config.tensor_parallel_size))
    group = create_group(open_store(rank, config.tensor_parallel_size, store_port), rank,
                         config.tensor_parallel_size, device)
    finished, runner = False, None
    try:
        runner = ModelRunner(config, group)
        mirror = SequenceMirror(config.kvcache_block_size)
        freeze_survivors()  # a full collection mid-run would hold up every rank's collectives
        while True:
            call: StepCall | str = channel.receive()
            if call == EXIT:
                finished = True
                break
            runner.run_without_sampling(mirror.apply(call), call.is_prefill, call.draw)
    except EOFError:
        logger.warning("tensor-parallel rank %d: rank 0 is gone; exiting", rank)
    finally:
        end_group(group, runner if finished else None, device, graceful=finished)
        channel.close()
