"""The model's ops that have a faster CUDA implementation than plain torch.

Layers take their ops from the set current while the model is built: eager (CPU, MPS, enforce_eager;
the reference) or CUDA (with graphs). Single-request decode is bound by the number of kernels per layer
and by how fast the linears stream their weights, so on CUDA the small elementwise ops are compiled
into one fused kernel each, q/k normalization, rotation and the KV-cache write are one Triton kernel,
and linears over a few rows use a Triton matrix-vector kernel, with the RMSNorm before them or the
activation of the MLP folded in. CPU-only builds never import Triton.
"""
import functools
from contextlib import contextmanager
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from nanovllm.utils.context import get_context


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


def linear(x: torch.Tensor, weight: torch.Tensor, gated: bool = False,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + bias. gated: x is [gate | up] ([N, 2 * in]) and the product takes silu_and_mul(x)."""
    return F.linear(silu_and_mul(x) if gated else x, weight, bias)


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


def norm_rotate_then_store(norm_rotate: Callable) -> Callable:
    """qk_norm_rotate_store(positions, q, k, v, q_weight, k_weight, eps, cos_sin_cache, attn) -> q:
    norm_rotate (a qk_norm_rotate), then k and v into the paged cache of attn (a layers.attention.Attention)."""
    def qk_norm_rotate_store(positions, q, k, v, q_weight, k_weight, eps, cos_sin_cache, attn):
        q, k = norm_rotate(positions, q, k, q_weight, k_weight, eps, cos_sin_cache)
        attn.store(k, v)
        return q
    return qk_norm_rotate_store


def norm_then_linear(rms_norm: Callable, add_rms_norm: Callable, linear: Callable) -> Callable:
    """norm_linear(x, residual, norm_weight, eps, weight, bias=None) -> (linear(norm(x + residual)),
    x + residual), made of separate ops; residual None: (linear(norm(x)), x)."""
    def norm_linear(x, residual, norm_weight, eps, weight, bias=None):
        if residual is None:
            return linear(rms_norm(x, norm_weight, eps), weight, bias=bias), x
        normed, residual = add_rms_norm(x, residual, norm_weight, eps)
        return linear(normed, weight, bias=bias), residual
    return norm_linear


class ModelOps(NamedTuple):
    rms_norm: Callable
    add_rms_norm: Callable
    qk_norm_rotate_store: Callable
    linear: Callable
    norm_linear: Callable  # a decoder layer's add & RMSNorm with the projection after it (norm_then_linear)


EAGER_OPS = ModelOps(rms_norm, add_rms_norm, norm_rotate_then_store(qk_norm_rotate), linear,
                     norm_then_linear(rms_norm, add_rms_norm, linear))


@functools.cache
def cuda_ops() -> ModelOps:
    from nanovllm.layers.gemv import gemv, gemv_applies, norm_gemv
    from nanovllm.layers.qk_norm_rope import qk_norm_rope_store

    # dynamic=True: one compilation serves every batch size instead of one per size.
    compiled_silu_and_mul = torch.compile(silu_and_mul, dynamic=True)
    compiled_rms_norm = torch.compile(rms_norm, dynamic=True)
    compiled_add_rms_norm = torch.compile(add_rms_norm, dynamic=True)

    def cuda_linear(x: torch.Tensor, weight: torch.Tensor, gated: bool = False,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
        if gemv_applies(x, weight):
            y = gemv(x, weight, gated)
            return y if bias is None else y + bias
        return F.linear(compiled_silu_and_mul(x) if gated else x, weight, bias)

    unfused_norm_linear = norm_then_linear(compiled_rms_norm, compiled_add_rms_norm, cuda_linear)
    unfused_qk_norm_rotate_store = norm_rotate_then_store(torch.compile(qk_norm_rotate, dynamic=True))

    def cuda_qk_norm_rotate_store(positions, q, k, v, q_weight, k_weight, eps, cos_sin_cache, attn):
        head_dim = q.shape[-1]
        if head_dim & (head_dim - 1):  # the kernel's tiles span a power of two
            return unfused_qk_norm_rotate_store(positions, q, k, v, q_weight, k_weight, eps, cos_sin_cache, attn)
        # Every backend shares the cache layout and slot mapping (attention/base.py), so one kernel
        # writes the cache for all of them.
        return qk_norm_rope_store(positions, q, k, v, q_weight, k_weight, eps, cos_sin_cache, attn.k_cache,
                                  attn.v_cache, get_context().slot_mapping)

    def cuda_norm_linear(x, residual, norm_weight, eps, weight, bias=None):
        if gemv_applies(x, weight):
            y, residual = norm_gemv(x, residual, norm_weight, eps, weight)
            return (y if bias is None else y + bias), residual
        return unfused_norm_linear(x, residual, norm_weight, eps, weight, bias)

    return ModelOps(compiled_rms_norm, compiled_add_rms_norm, cuda_qk_norm_rotate_store, cuda_linear,
                    cuda_norm_linear)


_building_ops = EAGER_OPS


@contextmanager
def building_with_ops(ops: ModelOps):
    """Layers constructed inside this block use `ops`."""
    global _building_ops
    previous, _building_ops = _building_ops, ops
    try:
        yield
    finally:
        _building_ops = previous


def current_ops() -> ModelOps:
    return _building_ops
