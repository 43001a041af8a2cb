"""The tensor-parallel group as layers see it. At world size 1 every collective is a no-op and no
process group exists; layers capture the group current while the model is built, so two engines in
one process never share state.

Each engine builds its own process group from its own TCPStore (on a port the OS picks) instead of
torch.distributed's global default group, which exists once per process: that is what lets two
tensor-parallel engines live in one process.
"""
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from nanovllm.utils.peer_all_reduce import PeerAllReduce

# A rank waits this long for the others to join the store, then for each collective. Generous:
# ranks load weights and capture CUDA graphs at different speeds. A rank that dies is noticed at
# once (gloo: the peer's socket closes; NCCL: the engine's watchdog aborts the group), not by this.
STORE_TIMEOUT = timedelta(minutes=2)
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class ParallelGroup:
    rank: int = 0
    world_size: int = 1
    group: "dist.ProcessGroup | None" = None
    peer: "PeerAllReduce | None" = None  # CUDA: small all-reduces over peer memory instead of NCCL

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """In place: x becomes the sum over the ranks."""
        if self.world_size > 1:
            if self.peer is not None and self.peer.fits(x):
                return self.peer.all_reduce(x)
            dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_async(self, x: torch.Tensor) -> "PendingSum":
        """Queue the in-place all-reduce of x and return at once, on NCCL's stream (gloo: its thread);
        world size > 1. Never the peer all-reduce, whose kernel runs on the current stream."""
        return PendingSum(x, dist.all_reduce(x, group=self.group, async_op=True))

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor | None:
        """Every rank's x concatenated along dim, on rank 0; None on the other ranks."""
        if self.world_size == 1:
            return x
        options = dist.GatherOptions()
        options.rootRank = 0
        if self.rank > 0:
            self.group.gather([], [x.contiguous()], options).wait()
            return None
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        self.group.gather([parts], [x.contiguous()], options).wait()
        return torch.cat(parts, dim)

    def shutdown(self, device: torch.device) -> None:
        """Every rank together, once no collective is pending: free the peer buffers, then the group."""
        if device.type == "cuda":
            if self.peer is not None:  # no rank frees its buffer while another may still read it
                dist.all_reduce(torch.zeros(1, device=device), group=self.group)
            torch.cuda.synchronize(device)
        if self.peer is not None:
            self.peer.close()
        self.group.shutdown()

    def abort(self) -> None:
        """End this rank's collectives now, also those waiting for a rank that died; any thread."""
        if self.peer is not None:
            self.peer.abort()
        self.group.abort()


@dataclass(frozen=True)
class PendingSum:
    tensor: torch.Tensor
    work: "dist.Work"

    def wait(self) -> torch.Tensor:
        """The sum; on CUDA the current stream waits for it, the host does not."""
        self.work.wait()
        return self.tensor


def open_store(rank: int, world_size: int, port: int = 0) -> dist.TCPStore:
    """Rank 0 hosts the store on a free port (port=0: the OS picks, so no two engines collide;
    read it back from store.port); the other ranks connect to that port."""
    return dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0, timeout=STORE_TIMEOUT,
                         wait_for_workers=False)


def create_group(store: dist.Store, rank: int, world_size: int, device: torch.device) -> ParallelGroup:
    """A process group of its own over store: gloo on CPU, NCCL (one GPU per rank) on CUDA.
    Every rank must call this at the same time; it returns once all have joined."""
    pg = dist.ProcessGroup(store, rank, world_size)
    if device.type == "cuda":
        # NVLink multicast (NVLS) reserves a lot of GPU memory and has hung NCCL set-ups; never use it.
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = COLLECTIVE_TIMEOUT
        backend = dist.ProcessGroupNCCL(store, rank, world_size, options)
        backend_type = dist.ProcessGroup.BackendType.NCCL
    else:
        backend = dist.ProcessGroupGloo(store, rank, world_size, COLLECTIVE_TIMEOUT)
        backend_type = dist.ProcessGroup.BackendType.GLOO
    backend._set_sequence_number_for_group()
    if device.type == "cuda":
        backend.eager_connect_single_device(device)  # connect now, not inside the first CUDA graph capture
    pg._set_default_backend(backend_type)
    pg._register_backend(device, backend_type, backend)
    peer = None
    if device.type == "cuda":
        from nanovllm.utils.peer_all_reduce import PeerAllReduce, peer_all_reduce_wanted  # imports Triton
        if peer_all_reduce_wanted(device, world_size):
            peer = PeerAllReduce(store, rank, world_size, device, COLLECTIVE_TIMEOUT.total_seconds())
    return ParallelGroup(rank, world_size, pg, peer)


_building_group = ParallelGroup()


@contextmanager
def building_with(group: ParallelGroup):
    """Layers constructed inside this block shard themselves for `group`."""
    global _building_group
    previous, _building_group = _building_group, group
    try:
        yield
    finally:
        _building_group = previous


def current_group() -> ParallelGroup:
    return _building_group
