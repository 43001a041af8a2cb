"""Small elementwise ops that torch.compile can fuse into one kernel each.

Layers take their ops from the set current while the model is built: eager (CPU, MPS, enforce_eager)
or compiled (CUDA with graphs). A compiled decode step launches a few fused kernels per layer
instead of dozens of tiny ones, which is what single-request decode is bound by.
"""
import functools
from contextlib import contextmanager
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


def _normalize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # In float32 like transformers, then cast back.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _normalize(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual)."""
    x = x + residual
    return _normalize(x, weight, eps), x


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [N, 2 * I] (gate then up) -> [N, I]."""
    gate, up = x.chunk(2, -1)
    return F.silu(gate) * up


def rotate(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor):
    """Neox-style rotary embedding. positions: [N]; q: [N, H, D]; k: [N, Hkv, D]; cache: [max_pos, D]."""
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, -1)

    def apply(x):
        x1, x2 = x.float().chunk(2, -1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)

    return apply(q), apply(k)


def qk_norm_rotate(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                   k_weight: torch.Tensor, eps: float, cos_sin_cache: torch.Tensor):
    """Qwen3's per-head RMSNorm of q and k, then the rotary embedding: one fused kernel when compiled."""
    return rotate(positions, _normalize(q, q_weight, eps), _normalize(k, k_weight, eps), cos_sin_cache)


class FusableOps(NamedTuple):
    rms_norm: Callable
    add_rms_norm: Callable
    silu_and_mul: Callable
    qk_norm_rotate: Callable


EAGER_OPS = FusableOps(rms_norm, add_rms_norm, silu_and_mul, qk_norm_rotate)


@functools.cache
def compiled_ops() -> FusableOps:
    # dynamic=True: one compilation serves every batch size instead of one per size.
    return FusableOps(*(torch.compile(op, dynamic=True) for op in EAGER_OPS))


_building_ops = EAGER_OPS


@contextmanager
def building_with_ops(ops: FusableOps):
    """Layers constructed inside this block use `ops`."""
    global _building_ops
    previous, _building_ops = _building_ops, ops
    try:
        yield
    finally:
        _building_ops = previous


def current_ops() -> FusableOps:
    return _building_ops
