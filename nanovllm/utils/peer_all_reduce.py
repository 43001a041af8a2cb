"""A one-shot all-reduce over peer GPU memory, for the all-reduces of tensor-parallel decoding.

A decode step of Qwen3-8B at TP=2 runs 73 all-reduces of one row per sequence: 8 KB at batch 1, 2 MB
at batch 256. NCCL takes about 9 us for the smallest and 30 us for 2 MB (BENCHMARKS.md), a quarter of a
TP=2 step at batch 256. Here every rank owns a receive buffer that every other rank has mapped (CUDA
IPC; NVLink between the GPUs), and one Triton kernel does the whole all-reduce:

  1. each program pushes its chunks of x into every peer's receive buffer, then
  2. waits for every peer's chunks to arrive in its own buffer and sums them with its own, in rank
     order, so every rank gets the same bits.

No flag tells a reader that a chunk has arrived, and so no memory fence orders data before a flag. (The
kernel this one replaced waited on per-chunk flags raised with system-scope release stores; it took 5 us
at 16 chunks but 955 us at 2 MB, perhaps for the reason HOST_CHECK_NS's comment gives.) Instead, as in
NCCL's low-latency protocol, every 8-byte word a rank pushes carries data and the epoch of the push:
here 4 bytes of data (two 16-bit elements or one float32) and, in the upper half, the epoch. An 8-byte
store is seen whole or not at all, so a reader that sees the current epoch in a word also sees that
word's data. This doubles the bytes on the link, and still beats NCCL up to 2 MB (17.5 against 30 us on
2 x H200; equal at 4 MB).

Epochs count the all-reduces of each chunk (here) on each rank's own device, so the kernel can be
captured in a CUDA graph and replayed. Receive buffers alternate between two slots by epoch: a rank may
push epoch e + 1 while a slower peer still reads epoch e, but not e + 2 before that peer has read e (it
waits for the peer's e + 1 first). Every program pushes all its chunks before it waits for any, so no
program waits for one that is itself waiting.

A second kernel (all_reduce_norm) takes a program per row and, once a row is summed, also does what a
decoder layer does next: the residual add and the RMSNorm, saving their kernel (utils/partial_sums.py).
It carries every decode step's large all-reduces (2 MB at batch 256), where the link's bytes set the
time, so its words pack more: three 16-bit elements and a 16-bit epoch (that of the row, compared
for equality, so wrapping is harmless), 1.33 bytes on the link per byte of data instead of 2. It has
its own slots and epochs, so the two kernels may follow each other in any order. A row's epoch
belongs to its place in the slots, so a group fuses rows of one width: that of its first call.

A waiting kernel cannot be cancelled like a NCCL collective, so it also watches a flag in pinned host
memory: `abort()` (a worker died) releases every waiting kernel at once, and the engine raises. A wait
longer than COLLECTIVE_TIMEOUT (a rank that hangs without dying) traps, which ends the process's CUDA
context with an error, as NCCL's watchdog ends a process whose collective timed out.

Messages of up to max_words(world size) 4-byte words (4 MB at two ranks) take this path: each kernel
has BUFFER_BYTES of receive buffer on each rank whatever the world size, so larger worlds take smaller
messages, as one-shot pushes world - 1 copies. Larger messages, and 16-bit ones of an odd number of
elements, go through NCCL.
"""
import logging
import os

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from nanovllm.layers.gemv import MAX_ROWS as GEMV_MAX_ROWS
from nanovllm.utils import cuda_ipc
from nanovllm.utils.pdl import pdl_enabled, release_next, wait_for_previous

logger = logging.getLogger(__name__)

BLOCK = 1024  # 4-byte words per chunk
MAX_GRID = 256  # programs; each loops over its chunks
# One kernel's slots in a rank's buffer: 2 epochs x (world - 1) peers x max_words x 8 bytes.
BUFFER_BYTES = 16 * 2**20
MAX_WORLD = 8
# A waiting program reads the host's abort word once per this much waiting. Such reads seem to be served
# one at a time: when every program read it every 256 polls, one late rank made each of its programs
# read, which made the next all-reduce's peer late in turn, and every all-reduce of a graph took 0.3-0.65
# ms instead of 5-25 us; reading it every 16 polls or every poll made every graph that slow or slower,
# in proportion to the programs (calls T-U in BENCHMARKS.md).
HOST_CHECK_NS = tl.constexpr(10_000_000)
# all_reduce_norm's rows, in elements: a program holds a row in registers; the narrowest sets how many
# rows (and row epochs) the largest message has.
NORM_ROW_ELEMENTS = (1024, 6144)
# all_reduce_norm from this many rows: below, the CUDA ops fold the norm into the GEMV after it.
FUSED_NORM_MIN_ROWS = GEMV_MAX_ROWS + 1
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # how a word holds its elements


def max_words(world_size: int) -> int:
    """The largest message, in 4-byte words, that the peer all-reduce takes at this world size."""
    return BUFFER_BYTES // (2 * (world_size - 1) * 8) // BLOCK * BLOCK


@triton.jit
def _trap():
    tl.inline_asm_elementwise("trap; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _pause():
    """Sleep about 100 ns. Polling without pauses made some all-reduces take 300 us instead of 5 to 10
    (at random sizes, in two runs of scripts/probe_all_reduce.py on 2 x H200); with them, fewer did.
    (Most likely the host reads that came every 256 polls then: see HOST_CHECK_NS.)"""
    tl.inline_asm_elementwise("nanosleep.u32 100; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _add_words(lo, hi, words, KIND: tl.constexpr):
    """Add the elements that int32 words hold to float32 sums: lo (the low halves, or whole float32
    words) and hi (the high halves)."""
    if KIND == 0:
        lo += words.to(tl.float32, bitcast=True)
    elif KIND == 1:  # a bfloat16 is the upper half of the float32 with the same value
        lo += (words << 16).to(tl.float32, bitcast=True)
        hi += (words & -65536).to(tl.float32, bitcast=True)
    else:
        lo += (words & 65535).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi += (words >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _to_words(lo, hi, KIND: tl.constexpr):
    """The int32 words that hold the float32 sums lo and hi rounded to the message's dtype."""
    if KIND == 0:
        return lo.to(tl.int32, bitcast=True)
    dtype: tl.constexpr = tl.bfloat16 if KIND == 1 else tl.float16
    low = lo.to(dtype).to(tl.int16, bitcast=True).to(tl.int32) & 65535
    high = hi.to(dtype).to(tl.int16, bitcast=True).to(tl.int32)
    return low | (high << 16)


@triton.jit
def _slot(address, writer, reader, epoch, SLOT_BYTES: tl.constexpr):
    """Where writer's words of this epoch land in reader's slots (at `address`, as mapped here): one slot
    per other rank and epoch parity. Slots are 16-byte aligned (buffers are, and SLOT_BYTES and the
    regions are multiples of 8 KB), which the hint tells the compiler: all_reduce_norm's pushes and polls,
    whose rows start at multiples of 8 words, then move two words per instruction (16-byte stores and
    volatile loads), about 10% faster than 8-byte ones (call W in BENCHMARKS.md). Each 8-byte word is
    still seen whole or not at all, which is all the epochs need."""
    index = tl.where(writer < reader, writer, writer - 1) * 2 + (epoch & 1)
    return tl.multiple_of((address + index.to(tl.int64) * SLOT_BYTES).to(tl.pointer_type(tl.int64)), 16)


@triton.jit
def _push(packed, words, mask, epoch, addresses_ptr, rank, WORLD: tl.constexpr, REGION: tl.constexpr,
          SLOT_BYTES: tl.constexpr):
    """Store this rank's packed 8-byte words (each carrying its epoch) at `words` of its slot in every
    peer's receive buffer; REGION: the byte offset of the kernel's slots in a buffer."""
    for peer in tl.static_range(WORLD):
        if peer != rank:
            slots = tl.load(addresses_ptr + peer) + REGION
            tl.store(_slot(slots, rank, peer, epoch, SLOT_BYTES) + words, packed, mask=mask)


@triton.jit
def _await(slot, mask, epoch, SHIFT: tl.constexpr, EPOCH_MASK: tl.constexpr, aborted, host_abort, deadline):
    """The words at slot (int64 pointers; masked ones excepted) once every one of them carries epoch in
    its bits from SHIFT up (compared under EPOCH_MASK) -> (words, aborted). Waiting stops at abort(),
    which it reads every HOST_CHECK_NS of waiting; past the deadline it traps."""
    expected = epoch.to(tl.int64) & EPOCH_MASK
    words = tl.load(slot, mask=mask, other=expected << SHIFT, volatile=True)
    check_at = tl.extra.cuda.globaltimer() + HOST_CHECK_NS
    while (tl.max(tl.reshape(((words >> SHIFT) & EPOCH_MASK) != expected, [words.numel]), 0) != 0) & ~aborted:
        now = tl.extra.cuda.globaltimer()
        if now > check_at:
            aborted = aborted | (tl.load(host_abort, volatile=True) != 0)
            check_at = now + HOST_CHECK_NS
            if now > deadline:
                _trap()
        _pause()
        words = tl.load(slot, mask=mask, other=expected << SHIFT, volatile=True)
    return words, aborted


@triton.jit
def _sum_arrivals(x_ptr, words, mask, epoch, own, rank, aborted, host_abort, deadline, WORLD: tl.constexpr,
                  KIND: tl.constexpr, SLOT_BYTES: tl.constexpr):
    """Every rank's words summed in rank order, this rank's from x_ptr, the peers' from this rank's
    receive buffer (at own) once all of them show epoch -> (lo, hi, aborted) (see _add_words)."""
    lo = tl.zeros(words.shape, tl.float32)
    hi = tl.zeros(words.shape, tl.float32)
    for peer in tl.static_range(WORLD):
        if peer == rank:
            received = tl.load(x_ptr + words, mask=mask)
        else:
            slot = _slot(own, peer, rank, epoch, SLOT_BYTES) + words
            packed, aborted = _await(slot, mask, epoch, 32, 0xFFFFFFFF, aborted, host_abort, deadline)
            received = packed.to(tl.int32)  # the low half: the data
        lo, hi = _add_words(lo, hi, received, KIND)
    return lo, hi, aborted


@triton.jit(do_not_specialize=["num_words", "rank"])
def _peer_all_reduce_kernel(x_ptr, out_ptr, num_words, addresses_ptr, rank, timeout_ns,
                            WORLD: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr,
                            SLOT_BYTES: tl.constexpr, CONTROL_BYTES: tl.constexpr, PDL: tl.constexpr):
    """x_ptr, out_ptr: int32 [num_words], the message's bytes. addresses_ptr: int64 [WORLD + 1]: every
    rank's receive buffer as mapped here, then the host abort word. The control words are [aborted,
    epoch of each chunk..., epoch of each row of all_reduce_norm...]."""
    release_next(PDL)
    wait_for_previous(PDL)
    own = tl.load(addresses_ptr + rank)
    control = (own + CONTROL_BYTES).to(tl.pointer_type(tl.int32))
    num_chunks = tl.cdiv(num_words, BLOCK)
    offsets = tl.arange(0, BLOCK)

    for chunk in range(tl.program_id(0), num_chunks, tl.num_programs(0)):
        words = chunk * BLOCK + offsets
        mask = words < num_words
        epoch = tl.load(control + 1 + chunk) + 1  # int32, wrapping: compared only for equality
        packed = (epoch.to(tl.int64) << 32) | (tl.load(x_ptr + words, mask=mask).to(tl.int64) & 0xFFFFFFFF)
        _push(packed, words, mask, epoch, addresses_ptr, rank, WORLD, 0, SLOT_BYTES)

    host_abort = tl.load(addresses_ptr + WORLD).to(tl.pointer_type(tl.int32))
    aborted = tl.load(control, volatile=True) != 0  # an earlier all-reduce was released by abort()
    deadline = tl.extra.cuda.globaltimer() + timeout_ns
    for chunk in range(tl.program_id(0), num_chunks, tl.num_programs(0)):
        words = chunk * BLOCK + offsets
        mask = words < num_words
        epoch = tl.load(control + 1 + chunk) + 1
        lo, hi, aborted = _sum_arrivals(x_ptr, words, mask, epoch, own, rank, aborted, host_abort, deadline, WORLD,
                                        KIND, SLOT_BYTES)
        tl.store(out_ptr + words, _to_words(lo, hi, KIND), mask=mask)
        tl.store(control + 1 + chunk, epoch)
    if aborted:
        tl.store(control, 1)


@triton.jit
def _thirds_mask(lanes, part: tl.constexpr, ROW: tl.constexpr, THIRD: tl.constexpr):
    return (lanes < THIRD) & (part * THIRD + lanes < ROW)


@triton.jit
def _load_thirds(row_ptr, lanes, ROW: tl.constexpr, THIRD: tl.constexpr):
    """A row of ROW elements as three [LANES] tensors: its elements lane, THIRD + lane and 2 THIRD +
    lane, for lanes below THIRD (0 elsewhere, and past the row's end)."""
    start = row_ptr + lanes
    return (tl.load(start, mask=_thirds_mask(lanes, 0, ROW, THIRD), other=0.0),
            tl.load(start + THIRD, mask=_thirds_mask(lanes, 1, ROW, THIRD), other=0.0),
            tl.load(start + 2 * THIRD, mask=_thirds_mask(lanes, 2, ROW, THIRD), other=0.0))


@triton.jit
def _store_thirds(row_ptr, lanes, first, second, third, ROW: tl.constexpr, THIRD: tl.constexpr):
    """The inverse of _load_thirds, rounding float32 values to the row's dtype."""
    start = row_ptr + lanes
    dtype: tl.constexpr = row_ptr.dtype.element_ty
    tl.store(start, first.to(dtype), mask=_thirds_mask(lanes, 0, ROW, THIRD))
    tl.store(start + THIRD, second.to(dtype), mask=_thirds_mask(lanes, 1, ROW, THIRD))
    tl.store(start + 2 * THIRD, third.to(dtype), mask=_thirds_mask(lanes, 2, ROW, THIRD))


@triton.jit
def _bits(value):
    """A 16-bit element's bits, in the low half of an int64."""
    return value.to(tl.int16, bitcast=True).to(tl.int64) & 0xFFFF


@triton.jit
def _pack_thirds(first, second, third, epoch):
    """Three 16-bit elements and the low 16 bits of epoch in one int64 word, the epoch on top."""
    return ((epoch.to(tl.int64) & 0xFFFF) << 48) | (_bits(third) << 32) | (_bits(second) << 16) | _bits(first)


@triton.jit
def _element(words, SHIFT: tl.constexpr, DTYPE: tl.constexpr):
    """The 16-bit element of DTYPE at bit SHIFT of int64 words, as float32."""
    return ((words >> SHIFT) & 0xFFFF).to(tl.int16).to(DTYPE, bitcast=True).to(tl.float32)


@triton.jit
def _unpack_thirds(words, DTYPE: tl.constexpr):
    """_pack_thirds' three elements, as float32."""
    return _element(words, 0, DTYPE), _element(words, 16, DTYPE), _element(words, 32, DTYPE)


@triton.jit
def _round(value, DTYPE: tl.constexpr):
    """A float32 value rounded to DTYPE and back, as a tensor of that dtype holds it."""
    return value.to(DTYPE).to(tl.float32)


@triton.jit(do_not_specialize=["num_rows", "rank"])
def _peer_all_reduce_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, num_rows,
                                 addresses_ptr, rank, timeout_ns, eps, HAS_RESIDUAL: tl.constexpr,
                                 WORLD: tl.constexpr, ROW: tl.constexpr, THIRD: tl.constexpr, LANES: tl.constexpr,
                                 REGION: tl.constexpr, SLOT_BYTES: tl.constexpr, CONTROL_BYTES: tl.constexpr,
                                 ROW_EPOCHS: tl.constexpr, PDL: tl.constexpr):
    """The all-reduce of a program per row, then the decoder's add and RMSNorm: residual_out = sum +
    residual (sum without one), out = rms_norm(residual_out) * weight, rounded to the dtype where the
    unfused ops round. x_ptr, residual_ptr, out_ptr, residual_out_ptr: [num_rows, ROW]; weight_ptr:
    [ROW]; one 16-bit dtype. A row travels as THIRD >= ROW / 3 words of three elements (see
    _load_thirds) and a 16-bit epoch, the row's, which is control word ROW_EPOCHS + row; its slots
    start REGION bytes into a receive buffer."""
    release_next(PDL)
    wait_for_previous(PDL)
    own = tl.load(addresses_ptr + rank)
    control = (own + CONTROL_BYTES).to(tl.pointer_type(tl.int32))
    lanes = tl.arange(0, LANES)
    used = lanes < THIRD

    for row in range(tl.program_id(0), num_rows, tl.num_programs(0)):
        epoch = tl.load(control + ROW_EPOCHS + row) + 1
        packed = _pack_thirds(*_load_thirds(x_ptr + row.to(tl.int64) * ROW, lanes, ROW, THIRD), epoch)
        _push(packed, row * THIRD + lanes, used, epoch, addresses_ptr, rank, WORLD, REGION, SLOT_BYTES)

    dtype: tl.constexpr = x_ptr.dtype.element_ty
    weight_1, weight_2, weight_3 = _load_thirds(weight_ptr, lanes, ROW, THIRD)
    host_abort = tl.load(addresses_ptr + WORLD).to(tl.pointer_type(tl.int32))
    aborted = tl.load(control, volatile=True) != 0
    deadline = tl.extra.cuda.globaltimer() + timeout_ns
    for row in range(tl.program_id(0), num_rows, tl.num_programs(0)):
        epoch_ptr = control + ROW_EPOCHS + row
        epoch = tl.load(epoch_ptr) + 1
        start = row.to(tl.int64) * ROW  # the row's first element
        sum_1 = tl.zeros([LANES], tl.float32)
        sum_2, sum_3 = sum_1, sum_1
        for peer in tl.static_range(WORLD):  # in rank order, so every rank gets the same bits
            if peer == rank:
                got_1, got_2, got_3 = _load_thirds(x_ptr + start, lanes, ROW, THIRD)
                got_1, got_2, got_3 = got_1.to(tl.float32), got_2.to(tl.float32), got_3.to(tl.float32)
            else:
                slot = _slot(own + REGION, peer, rank, epoch, SLOT_BYTES) + row * THIRD + lanes
                words, aborted = _await(slot, used, epoch, 48, 0xFFFF, aborted, host_abort, deadline)
                got_1, got_2, got_3 = _unpack_thirds(words, dtype)
            sum_1, sum_2, sum_3 = sum_1 + got_1, sum_2 + got_2, sum_3 + got_3
        # the all-reduce's result
        sum_1, sum_2, sum_3 = _round(sum_1, dtype), _round(sum_2, dtype), _round(sum_3, dtype)
        if HAS_RESIDUAL:
            res_1, res_2, res_3 = _load_thirds(residual_ptr + start, lanes, ROW, THIRD)
            sum_1 = _round(sum_1 + res_1.to(tl.float32), dtype)
            sum_2 = _round(sum_2 + res_2.to(tl.float32), dtype)
            sum_3 = _round(sum_3 + res_3.to(tl.float32), dtype)
        _store_thirds(residual_out_ptr + start, lanes, sum_1, sum_2, sum_3, ROW, THIRD)
        rstd = 1.0 / tl.sqrt(tl.sum(sum_1 * sum_1 + sum_2 * sum_2 + sum_3 * sum_3, 0) / ROW + eps)
        _store_thirds(out_ptr + start, lanes, _round(sum_1 * rstd, dtype) * weight_1.to(tl.float32),
                      _round(sum_2 * rstd, dtype) * weight_2.to(tl.float32),
                      _round(sum_3 * rstd, dtype) * weight_3.to(tl.float32), ROW, THIRD)
        tl.store(epoch_ptr, epoch)
    if aborted:
        tl.store(control, 1)


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
        self.max_words = max_words(world_size)
        self.fuses_norm = os.environ.get("NANOVLLM_FUSED_NORM", "1") != "0"  # all_reduce_norm's kernel
        self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self._slot_bytes = self.max_words * 8
        self._norm_region = 2 * (world_size - 1) * self._slot_bytes  # after the plain kernel's slots
        self._control_bytes = 2 * self._norm_region
        self._row_epochs = 1 + self.max_words // BLOCK  # [aborted, epoch of each chunk..., of each row...]
        control_words = self._row_epochs + 2 * self.max_words // NORM_ROW_ELEMENTS[0]
        self._norm_width: int | None = None  # all_reduce_norm's row width, fixed by its first call
        self._own = cuda_ipc.allocate(self._control_bytes + 4 * control_words)
        try:
            # Epochs start at 0 and slots hold epoch 0 on every rank before any handle is published.
            cuda_ipc.as_int32_tensor(self._own, self._control_bytes // 4 + control_words, device).zero_()
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
        """Whether x can take this path: its bytes are whole 4-byte words, 4-byte aligned, and few enough."""
        nbytes = x.numel() * x.element_size()
        return (x.dtype in _KINDS and x.is_contiguous() and x.device == self.device
                and 0 < nbytes <= 4 * self.max_words and nbytes % 4 == 0
                and x.storage_offset() * x.element_size() % 4 == 0)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """In place, as dist.all_reduce: x becomes the sum of every rank's x. x must fit (see fits)."""
        pdl = pdl_enabled(x.device)
        words = x.view(-1).view(torch.int32)  # flat first: a 16-bit row may hold an odd number
        grid = min(triton.cdiv(words.numel(), BLOCK), MAX_GRID)
        _peer_all_reduce_kernel[(grid,)](
            words, words, words.numel(), self._addresses, self.rank, self.timeout_ns, WORLD=self.world_size,
            KIND=_KINDS[x.dtype], BLOCK=BLOCK, SLOT_BYTES=self._slot_bytes, CONTROL_BYTES=self._control_bytes,
            PDL=pdl, num_warps=4, launch_pdl=pdl,
        )
        return x

    def fits_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> bool:
        """Whether all_reduce_norm takes x [rows, hidden]: 16-bit, fits, at least FUSED_NORM_MIN_ROWS
        rows of NORM_ROW_ELEMENTS, a multiple of 8, the width of the first call (see the module's
        docstring), residual and weight alike, all 16-byte aligned (the register counts in
        all_reduce_norm hold for such rows)."""
        hidden = x.shape[-1]
        tensors = (x, weight) if residual is None else (x, weight, residual)
        return (self.fuses_norm and x.dim() == 2 and x.shape[0] >= FUSED_NORM_MIN_ROWS
                and x.dtype in (torch.bfloat16, torch.float16) and self.fits(x)
                and NORM_ROW_ELEMENTS[0] <= hidden <= NORM_ROW_ELEMENTS[1] and hidden % 8 == 0
                and hidden == (self._norm_width or hidden)
                and weight.dtype == x.dtype and weight.is_contiguous() and weight.shape == x.shape[-1:]
                and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape
                                          and residual.is_contiguous()))
                and all(t.data_ptr() % 16 == 0 for t in tensors))

    def all_reduce_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [rows, hidden] this rank's partial sum -> (rms_norm(total + residual) * weight, total +
        residual) as new tensors, total being the sum over the ranks (residual None: norm(total), total):
        the all-reduce and the decoder's add and RMSNorm in one kernel. x must fit (see fits_norm)."""
        pdl = pdl_enabled(x.device)
        out, residual_out = torch.empty_like(x), torch.empty_like(x)
        self._norm_width = hidden = x.shape[-1]
        # A third of a row, rounded up to 8 elements: 16-byte aligned thirds load and store 16 bytes at a
        # time (for sm_90a it also halves the layout conversions through shared memory).
        third = triton.cdiv(triton.cdiv(hidden, 3), 8) * 8
        # Every program must be resident at once: a program waits for the peer's program of the same
        # id, which may only start once one of the peer's resident programs ends. Compiled for sm_90a
        # at 8 warps (Triton 3.6) for rows that fits_norm takes, the kernel takes at most 105 registers
        # at two ranks and 116 at three to eight, and 16 KB of shared memory: two programs fit an SM. (Rows
        # of an odd width or unaligned took 128, the whole register file for two. The plain kernel, 78
        # registers at 4 warps, fits six.)
        _peer_all_reduce_norm_kernel[(min(x.shape[0], MAX_GRID, 2 * self._num_sms),)](
            x, x if residual is None else residual, weight, out, residual_out, x.shape[0], self._addresses,
            self.rank, self.timeout_ns, eps, HAS_RESIDUAL=residual is not None, WORLD=self.world_size,
            ROW=hidden, THIRD=third, LANES=triton.next_power_of_2(third), REGION=self._norm_region,
            SLOT_BYTES=self._slot_bytes, CONTROL_BYTES=self._control_bytes, ROW_EPOCHS=self._row_epochs,
            PDL=pdl, num_warps=8, launch_pdl=pdl,
        )
        return out, residual_out

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
