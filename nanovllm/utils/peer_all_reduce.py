"""A one-shot all-reduce over peer GPU memory, for the small all-reduces of tensor-parallel decoding.

A decode step of Qwen3-8B at TP=2 runs 73 all-reduces of one row per sequence (8 KB at batch 1).
NCCL's latency for such messages, about 20 us each, was most of the gap between TP=2 and half of
TP=1's step (BENCHMARKS.md). Here every rank owns a buffer that every other rank has mapped (CUDA IPC;
NVLink between the GPUs), and one Triton kernel does the whole all-reduce:

  1. each program copies its 1024-element chunk of x into its own rank's buffer,
  2. raises its flag for that chunk in every rank's buffer (a release store at system scope),
  3. waits until every rank's flag for the chunk is up (acquire), then
  4. sums the chunk from every rank's buffer, in rank order, so every rank gets the same bits.

Flags carry an epoch per chunk (program) that each rank's kernel counts on its own device, so the
kernel can be captured in a CUDA graph and replayed. Buffers alternate between two slots by epoch:
a rank may write epoch e + 1 while a slower peer still reads epoch e, but it cannot write e + 2 before
that peer has read e (it waits for the peer's e + 1 flag first).

A waiting kernel cannot be cancelled like a NCCL collective, so it also watches a flag in pinned host
memory: `abort()` (a worker died) releases every waiting kernel at once, and the engine raises. A wait
longer than COLLECTIVE_TIMEOUT (a rank that hangs without dying) traps, which ends the process's CUDA
context with an error, as NCCL's watchdog ends a process whose collective timed out.

Only messages of at most MAX_PROGRAMS chunks (16K elements: a decode batch of up to 4 rows of Qwen3-8B,
16 of Qwen3-0.6B) take this path; larger ones go through NCCL. Measured on 2 x H200
(scripts/probe_all_reduce.py, BENCHMARKS.md): 5.4 us against NCCL's 8.9 us for one row, 6.2 against 9.8
at 16 chunks, but 205 us at 64 chunks and 2.4 ms at 2,048 (NCCL: 10 and 30 us). Why it degrades with
the grid is not established (each program's system-scope release and acquire are the suspects).
"""
import logging
import os

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from nanovllm.utils import cuda_ipc
from nanovllm.utils.pdl import pdl_enabled, release_next, wait_for_previous

logger = logging.getLogger(__name__)

BLOCK = 1024  # elements per program (chunk)
MAX_PROGRAMS = 16
MAX_ELEMENTS = BLOCK * MAX_PROGRAMS
SLOT_BYTES = MAX_ELEMENTS * 4  # one epoch's data of one rank, float32 at most; two slots per rank
MAX_WORLD = 8
# Control words after the two slots: [aborted, epochs[MAX_PROGRAMS], flags[MAX_WORLD][MAX_PROGRAMS]] (int32).
_EPOCHS, _FLAGS = 1, 1 + MAX_PROGRAMS
_CONTROL_WORDS = _FLAGS + MAX_WORLD * MAX_PROGRAMS
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _trap():
    tl.inline_asm_elementwise("trap; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit(do_not_specialize=["numel", "rank"])
def _peer_all_reduce_kernel(x_ptr, out_ptr, numel, addresses_ptr, rank, timeout_ns,
                            WORLD: tl.constexpr, BLOCK: tl.constexpr, SLOT_BYTES: tl.constexpr,
                            MAX_PROGRAMS: tl.constexpr, EPOCHS: tl.constexpr, FLAGS: tl.constexpr,
                            PDL: tl.constexpr):
    """addresses_ptr: int64 [WORLD + 1]: every rank's buffer as mapped here, then the host abort word."""
    program = tl.program_id(0)
    release_next(PDL)
    wait_for_previous(PDL)
    dtype = x_ptr.dtype.element_ty
    offsets = program * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    x = tl.load(x_ptr + offsets, mask=mask)
    own = tl.load(addresses_ptr + rank)
    control = (own + 2 * SLOT_BYTES).to(tl.pointer_type(tl.int32))
    epoch = tl.load(control + EPOCHS + program) + 1  # int32, wrapping: compared only for equality
    slot_offset = (epoch & 1).to(tl.int64) * SLOT_BYTES
    tl.store((own + slot_offset).to(tl.pointer_type(dtype)) + offsets, x, mask=mask)
    tl.debug_barrier()  # the whole chunk is written before any thread announces it
    for peer in tl.static_range(WORLD):
        peer_control = (tl.load(addresses_ptr + peer) + 2 * SLOT_BYTES).to(tl.pointer_type(tl.int32))
        tl.atomic_xchg(peer_control + FLAGS + rank * MAX_PROGRAMS + program, epoch, sem="release", scope="sys")

    host_abort = tl.load(addresses_ptr + WORLD).to(tl.pointer_type(tl.int32))
    aborted = tl.load(control, volatile=True) != 0  # an earlier all-reduce was released by abort()
    deadline = tl.extra.cuda.globaltimer() + timeout_ns
    for peer in tl.static_range(WORLD):
        # A peer's flag is epoch - 1 until it raises it (it may already be at epoch + 1).
        flag = control + FLAGS + peer * MAX_PROGRAMS + program
        waiting = (tl.atomic_add(flag, 0, sem="acquire", scope="sys") == epoch - 1) & ~aborted
        spins = 0
        while waiting:
            spins += 1
            if spins % 256 == 0:
                aborted = aborted | (tl.load(host_abort, volatile=True) != 0)
                if tl.extra.cuda.globaltimer() > deadline:
                    _trap()
            waiting = (tl.atomic_add(flag, 0, sem="acquire", scope="sys") == epoch - 1) & ~aborted
    if aborted:
        tl.store(control, 1)
    tl.debug_barrier()  # every thread reads after the flags were seen

    total = tl.zeros([BLOCK], tl.float32)
    for peer in tl.static_range(WORLD):
        slot = (tl.load(addresses_ptr + peer) + slot_offset).to(tl.pointer_type(dtype))
        total += tl.load(slot + offsets, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    tl.store(out_ptr + offsets, total.to(dtype), mask=mask)
    tl.store(control + EPOCHS + program, epoch)


def peer_all_reduce_wanted(device: torch.device, world_size: int) -> bool:
    """Whether a CUDA group should set up the peer all-reduce: every pair of its GPUs can map each
    other's memory (NVLink or PCIe peer access), at most MAX_WORLD ranks, and NANOVLLM_PEER_ALL_REDUCE
    is not 0. (Ranks run on GPUs 0 .. world_size - 1, one each.)"""
    if device.type != "cuda" or not 1 < world_size <= MAX_WORLD:
        return False
    if os.environ.get("NANOVLLM_PEER_ALL_REDUCE", "1") == "0":
        return False
    return all(torch.cuda.can_device_access_peer(a, b) for a in range(world_size) for b in range(world_size)
               if a != b)


class PeerAllReduce:
    """One rank's side. Every rank of the group must construct it at the same time (they exchange
    buffer handles through `store`) and call all_reduce on the same tensors' shapes in the same order."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, device: torch.device, timeout_s: float):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.timeout_ns = int(timeout_s * 1e9)
        self._opened: list[int] = []
        self._host_abort = torch.zeros(1, dtype=torch.int32, pin_memory=True)  # read by the GPU (UVA)
        self._own = cuda_ipc.allocate(2 * SLOT_BYTES + 4 * _CONTROL_WORDS)
        try:
            control = cuda_ipc.as_int32_tensor(self._own + 2 * SLOT_BYTES, _CONTROL_WORDS, device)
            control.zero_()  # epochs and flags start at 0 on every rank before any handle is published
            torch.cuda.synchronize(device)
            store.set(f"peer_all_reduce/{rank}", cuda_ipc.export_handle(self._own))
            addresses = []
            for peer in range(world_size):
                if peer == rank:
                    addresses.append(self._own)
                else:
                    self._opened.append(cuda_ipc.open_handle(store.get(f"peer_all_reduce/{peer}")))
                    addresses.append(self._opened[-1])
            addresses.append(self._host_abort.data_ptr())
            self._addresses = torch.tensor(addresses, dtype=torch.int64, device=device)
        except BaseException:
            self.close()
            raise

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype in _DTYPES and x.is_contiguous() and 0 < x.numel() <= MAX_ELEMENTS and x.device == self.device

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """In place, as dist.all_reduce: x becomes the sum of every rank's x. x must fit (see fits)."""
        pdl = pdl_enabled(x.device)
        _peer_all_reduce_kernel[(triton.cdiv(x.numel(), BLOCK),)](
            x, x, x.numel(), self._addresses, self.rank, self.timeout_ns, WORLD=self.world_size, BLOCK=BLOCK,
            SLOT_BYTES=SLOT_BYTES, MAX_PROGRAMS=MAX_PROGRAMS, EPOCHS=_EPOCHS, FLAGS=_FLAGS, PDL=pdl,
            num_warps=4, launch_pdl=pdl,
        )
        return x

    def abort(self) -> None:
        """Release every all-reduce waiting on this rank now and for good (their results are garbage);
        safe from any thread, since it only writes host memory."""
        self._host_abort[0] = 1

    def close(self) -> None:
        """Unmap the peers' buffers and free this rank's. Only once no kernel of any rank can still
        touch them (after a barrier, or when the ranks are being torn down)."""
        for address in self._opened:
            cuda_ipc.close_handle(address)
        self._opened = []
        if self._own:
            cuda_ipc.free(self._own)
            self._own = 0
