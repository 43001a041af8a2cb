"""Attention backends behind one small contract (base.AttentionBackend), registered lazily so a
missing Triton or flash-attn never breaks CPU or MPS."""
import importlib
import importlib.util
import logging

from nanovllm.attention.base import AttentionBackend

logger = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "flash-attn", "triton", "torch")

# name -> (module, class); imported only when chosen.
_REGISTRY = {
    "torch": ("nanovllm.attention.torch_backend", "TorchAttentionBackend"),
    "triton": ("nanovllm.attention.triton_backend", "TritonAttentionBackend"),
    "flash-attn": ("nanovllm.attention.flash_attn_backend", "FlashAttnBackend"),
}


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# flash-attn's paged KV cache needs blocks of a multiple of this many tokens.
FLASH_ATTN_BLOCK_MULTIPLE = 256


def resolve_backend_name(requested: str, device_type: str, block_size: int) -> str:
    """Turn "auto" into a concrete backend for the device; reject what the device cannot run."""
    flash_fits = block_size % FLASH_ATTN_BLOCK_MULTIPLE == 0
    if requested == "auto":
        if device_type == "cuda":
            if flash_fits and _importable("flash_attn"):
                return "flash-attn"
            if _importable("triton"):
                return "triton"
        return "torch"
    if requested != "torch" and device_type != "cuda":
        raise ValueError(f"attention_backend={requested!r} needs a CUDA device, got device={device_type!r}; "
                         f"use 'torch' or 'auto'")
    needed = {"triton": "triton", "flash-attn": "flash_attn"}.get(requested)
    if needed and not _importable(needed):
        raise ValueError(f"attention_backend={requested!r} but the {needed!r} package is not installed")
    if requested == "flash-attn" and not flash_fits:
        raise ValueError(f"attention_backend='flash-attn' needs kvcache_block_size to be a multiple of "
                         f"{FLASH_ATTN_BLOCK_MULTIPLE}, got {block_size}")
    return requested


def create_backend(name: str) -> AttentionBackend:
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)()
