"""Which attention backend "auto" picks, and clear errors for backends a device cannot run."""
import pytest

import nanovllm.attention as attention


@pytest.mark.parametrize("installed, block_size, expected", [
    ({"flash_attn", "triton"}, 256, "flash-attn"),
    ({"flash_attn", "triton"}, 16, "triton"),      # flash-attn's paged cache needs 256-token multiples
    ({"triton"}, 256, "triton"),
    (set(), 256, "torch"),
])
def test_auto_on_cuda_prefers_flash_attn_then_triton(monkeypatch, installed, block_size, expected):
    monkeypatch.setattr(attention, "_importable", lambda module: module in installed)
    assert attention.resolve_backend_name("auto", "cuda", block_size) == expected


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_auto_elsewhere_is_torch(device):
    assert attention.resolve_backend_name("auto", device, 256) == "torch"


@pytest.mark.parametrize("backend", ["triton", "flash-attn"])
def test_gpu_backends_on_cpu_are_rejected(backend):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        attention.resolve_backend_name(backend, "cpu", 256)


def test_missing_package_and_bad_block_size_are_named(monkeypatch):
    monkeypatch.setattr(attention, "_importable", lambda module: False)
    with pytest.raises(ValueError, match="'flash_attn' package is not installed"):
        attention.resolve_backend_name("flash-attn", "cuda", 256)
    monkeypatch.setattr(attention, "_importable", lambda module: True)
    with pytest.raises(ValueError, match="multiple of 256"):
        attention.resolve_backend_name("flash-attn", "cuda", 16)
