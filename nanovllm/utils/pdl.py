"""Programmatic dependent launch (PDL) for the small decode kernels, on Hopper GPUs and newer.

A decode step at batch 1 is about 200 kernels of a few microseconds each, and each pays a fixed cost
to launch, issue its first loads and drain. With PDL a kernel may start while the one before it in the
stream (or CUDA graph) is still running: `release_next` lets the next kernel launch, and `wait_for_previous`
blocks until the previous kernel has finished and its writes are visible. Between the two a kernel may
only read what no earlier kernel writes, such as weights (the GEMV fetches its first weight tile there).
Every kernel launched with PDL must call `wait_for_previous` before it touches activations, even one it
only writes: the previous kernel may still be reading that memory.

Imported only by Triton kernels (CPU-only builds never import Triton). NANOVLLM_PDL=0 turns it off.
"""
import os
from functools import lru_cache

import torch
import triton
import triton.language as tl


@lru_cache
def pdl_enabled(device: torch.device) -> bool:
    """Launch with PDL on this device: a CUDA GPU of compute capability 9.0 or more (never Triton's CPU
    interpreter, which cannot run the PTX instructions)."""
    return (device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and os.environ.get("NANOVLLM_PDL", "1") != "0" and torch.cuda.get_device_capability(device)[0] >= 9)


@triton.jit
def release_next(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
