"""GPU memory that another process on the same host maps into its own address space (CUDA IPC), through
the CUDA driver API loaded with ctypes: no extension to build, and none of the reference-counting files
torch's tensor sharing leaves in /dev/shm. Used by the peer all-reduce (utils/peer_all_reduce.py).

Each call runs on the calling thread's current CUDA context: the rank's device, which torch made current.
"""
import ctypes
from functools import cache

import torch

_LAZY_ENABLE_PEER_ACCESS = 1  # CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]  # CUipcMemHandle


@cache
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _check(result: int, call: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(result, ctypes.byref(name))
        raise RuntimeError(f"{call} failed: CUDA driver error {result} ({(name.value or b'?').decode()})")


def allocate(nbytes: int) -> int:
    """A device allocation of its own (not torch's cache, whose blocks share allocations): its address."""
    address = ctypes.c_uint64()
    _check(_driver().cuMemAlloc_v2(ctypes.byref(address), ctypes.c_size_t(nbytes)), "cuMemAlloc")
    return address.value


def free(address: int) -> None:
    _check(_driver().cuMemFree_v2(ctypes.c_uint64(address)), "cuMemFree")


def export_handle(address: int) -> bytes:
    """The 64-byte handle another process opens to map the allocation at `address`."""
    handle = _IpcHandle()
    _check(_driver().cuIpcGetMemHandle(ctypes.byref(handle), ctypes.c_uint64(address)), "cuIpcGetMemHandle")
    return ctypes.string_at(ctypes.addressof(handle), ctypes.sizeof(handle))  # (.reserved stops at a zero byte)


def open_handle(handle: bytes) -> int:
    """Map another process's allocation into this one (peer access over NVLink enabled as needed): its
    address here."""
    address = ctypes.c_uint64()
    ipc = _IpcHandle.from_buffer_copy(handle)
    _check(_driver().cuIpcOpenMemHandle_v2(ctypes.byref(address), ipc, ctypes.c_uint(_LAZY_ENABLE_PEER_ACCESS)),
           "cuIpcOpenMemHandle")
    return address.value


def close_handle(address: int) -> None:
    _check(_driver().cuIpcCloseMemHandle(ctypes.c_uint64(address)), "cuIpcCloseMemHandle")


class _DeviceArray:
    """Exposes raw device memory through __cuda_array_interface__, which torch.as_tensor wraps without a copy."""

    def __init__(self, address: int, numel: int, typestr: str):
        self.__cuda_array_interface__ = {"shape": (numel,), "typestr": typestr, "data": (address, False),
                                         "version": 3, "strides": None}


def as_int32_tensor(address: int, numel: int, device: torch.device) -> torch.Tensor:
    """A torch view of numel int32 at `address` on `device` (no copy; the memory stays owned by the caller)."""
    return torch.as_tensor(_DeviceArray(address, numel, "<i4"), device=device)
