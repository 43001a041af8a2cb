"""Time the small-batch linear kernel (nanovllm/layers/gemv.py) against cuBLAS at the decode shapes of
Qwen3-0.6B and Qwen3-8B (whole and split over two ranks), with its default launch configuration and,
with --search, the best of a grid of configurations. Shapes marked "+norm" run the kernel with the add &
RMSNorm in front (norm_gemv), against cuBLAS's product alone.

Each timing is a CUDA-graph replay of the product over enough distinct weight copies (>= 256 MiB) that
none is still in L2 when read, as in a decode step, where every weight is read once. Reported per
product: microseconds and weight bytes read per second.

    PYTHONPATH=. python3 scripts/probe_gemv.py [--rows 1 2] [--shapes "0.6b qkv" ...] [--search]
"""
import argparse
import itertools

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from nanovllm.layers import gemv as gemv_module, ops

DTYPE = torch.bfloat16
# name -> (N, K, kind): kind "plain", "gated" (x = [gate | up]) or "norm" (add & RMSNorm first)
SHAPES = {
    "0.6b qkv": (4096, 1024, "plain"), "0.6b qkv+norm": (4096, 1024, "norm"), "0.6b o": (1024, 2048, "plain"),
    "0.6b gate_up": (6144, 1024, "plain"), "0.6b down": (1024, 3072, "gated"), "0.6b lm_head": (151936, 1024, "plain"),
    "0.6b gate_up+norm": (6144, 1024, "norm"),
    "8b qkv": (6144, 4096, "plain"), "8b qkv+norm": (6144, 4096, "norm"), "8b o": (4096, 4096, "plain"),
    "8b gate_up": (24576, 4096, "plain"),
    "8b gate_up+norm": (24576, 4096, "norm"), "8b down": (4096, 12288, "gated"),
    "8b/2 qkv": (3072, 4096, "plain"), "8b/2 qkv+norm": (3072, 4096, "norm"), "8b/2 o": (4096, 2048, "plain"),
    "8b/2 gate_up": (12288, 4096, "plain"), "8b/2 gate_up+norm": (12288, 4096, "norm"),
    "8b/2 down": (4096, 6144, "gated"),
}
BLOCK_NS, BLOCK_KS, WARPS = (2, 4, 8, 16), (256, 512, 1024, 2048), (4, 8)


def per_call_us(fn, weights) -> float:
    fn(weights[0])  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(w)
    return do_bench(graph.replay, warmup=5, rep=60, return_mode="median") * 1e3 / len(weights)


def copy_bandwidth() -> float:
    src = torch.empty(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.nbytes / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)


def cublas(x, w, kind):
    if kind == "gated":
        gate, up = x.chunk(2, -1)
        x = F.silu(gate) * up
    return F.linear(x, w)


def kernel(x, w, kind, config):
    """The gemv kernel on x (with a residual and norm weight of ones for "norm"), in config."""
    if kind != "norm":
        return gemv_module.gemv(x, w, kind == "gated", config)
    ones = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
    return gemv_module._launch(x, w, False, x, torch.empty_like(x), ones, 1e-6, config)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--search", action="store_true", help="also search the launch configurations")
    args = p.parse_args()
    print(f"copy bandwidth {copy_bandwidth() / 1e12:.2f} TB/s")
    for name in args.shapes:
        n, k, kind = SHAPES[name]
        copies = max(2, min(64, (256 << 20) // (n * k * 2)))
        weights = [torch.randn(n, k, dtype=DTYPE, device="cuda") * 0.02 for _ in range(copies)]
        nbytes = n * k * 2
        default = gemv_module._config(n, k, kind == "norm")
        ranked = None
        for rows in args.rows:
            x = torch.randn(rows, 2 * k if kind == "gated" else k, dtype=DTYPE, device="cuda")
            base = per_call_us(lambda w: cublas(x, w, kind), weights)
            configs = [default]
            if args.search:  # search at the first row count, then try the best few at the others
                if ranked is None:
                    grid = [c for c in itertools.product(BLOCK_NS, BLOCK_KS, WARPS)
                            if c[0] * c[1] <= 8192 and c[1] <= triton.next_power_of_2(k)]
                    times = {c: per_call_us(lambda w: kernel(x, w, kind, c), weights) for c in grid}
                    ranked = sorted(times, key=times.get)[:4]
                configs += ranked
            times = {c: per_call_us(lambda w: kernel(x, w, kind, c), weights) for c in dict.fromkeys(configs)}
            best = min(times, key=times.get)
            if kind == "norm":  # the reference: the same add & RMSNorm (with ones) in torch, then cuBLAS
                ref = cublas(ops.rms_norm(x + x, torch.ones_like(x[0]), 1e-6), weights[0], kind).float()
            else:
                ref = cublas(x, weights[0], kind).float()
            err = (kernel(x, weights[0], kind, best).float() - ref).abs().max().item() / ref.abs().max().item()
            line = (f"{name:13s} M={rows}: cuBLAS {base:7.2f} us {nbytes / base / 1e6:5.2f} TB/s | gemv "
                    f"{times[default]:7.2f} us {nbytes / times[default] / 1e6:5.2f} TB/s x{base / times[default]:.2f}")
            if args.search:
                line += (f" | best {times[best]:7.2f} us (BN,BK,warps)={best} x{base / times[best]:.2f}")
            print(f"{line} | rel err {err:.1e}", flush=True)
        del weights


if __name__ == "__main__":
    main()
