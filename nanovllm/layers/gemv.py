"""y = x W^T for a decode batch of a few rows: a Triton kernel that streams W at memory bandwidth.

At one to a few rows a linear layer is a matrix-vector product bound by reading the weight once.
cuBLAS reaches about half the H100's bandwidth there (BENCHMARKS.md: 0.78 ms of a 1.35 ms step for
1.2 GB of weights), and adds a split-K reduction kernel to narrow products. Each program here owns
BLOCK_N output features of every row and walks the whole reduction dimension, so one launch does it all.
The loads of the next tile go out before the current one is multiplied, and products accumulate
elementwise, summed across threads once at the end: the loop waits on memory, never on a reduction.

`gated=True` takes x = [gate | up] ([M, 2K]) and multiplies by silu(gate) * up, computed while
loading: the MLP's activation needs no kernel of its own. `norm_gemv` applies the add and RMSNorm in
front of a projection the same way, so the norms need no kernels of their own either.
"""
import torch
import triton
import triton.language as tl

from nanovllm.utils.pdl import pdl_enabled, release_next, wait_for_previous

# Rows up to this many use the kernel. Measured on an H200 (scripts/probe_gemv.py, BENCHMARKS.md): at one
# row it is 1.2-4.5x faster than cuBLAS on the narrow products (o and down projections) and within
# 0.89-0.96x of cuBLAS's product alone on the wide ones, whose norm it also does; at two rows (configured
# for one) it ranges from 0.5x to 2.8x; from four rows on, each program's [rows, BLOCK_N, BLOCK_K]
# products cost more than cuBLAS's tiles.
MAX_ROWS = 2


@triton.jit
def _load_weight(w_ptr, features, feature_mask, stride_w, k_start, K, BLOCK_K: tl.constexpr):
    """The [BLOCK_N, BLOCK_K] tile of W at k_start. Read once per step: kept out of L2's way."""
    ks = k_start + tl.arange(0, BLOCK_K)
    return tl.load(w_ptr + features[:, None] * stride_w + ks[None, :],
                   mask=feature_mask[:, None] & (ks < K)[None, :], other=0.0, eviction_policy="evict_first")


@triton.jit
def _load_input(x_ptr, residual_ptr, norm_weight_ptr, rows, row_mask, k_start, K, stride_x, BLOCK_K: tl.constexpr,
                GATED: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """The loads behind the input's tile at k_start, issued apart from their arithmetic (_input_tile) so
    that they can be in flight while an earlier tile is multiplied: (x, residual, norm weight, up),
    with x standing in for those the kernel does not use."""
    ks = k_start + tl.arange(0, BLOCK_K)
    k_mask = ks < K
    offsets = rows[:, None] * stride_x + ks[None, :]
    mask = row_mask[:, None] & k_mask[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)  # [BLOCK_M, BLOCK_K]
    residual, norm_weight, up = x, x, x
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + offsets, mask=mask, other=0.0)
    if NORM:
        norm_weight = tl.load(norm_weight_ptr + ks, mask=k_mask, other=0.0)  # [BLOCK_K]
    if GATED:
        up = tl.load(x_ptr + offsets + K, mask=mask, other=0.0)
    return x, residual, norm_weight, up


@triton.jit
def _add_residual(x, residual, HAS_RESIDUAL: tl.constexpr):
    """x + residual rounded to x's dtype, as the unfused add's output is."""
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _input_tile(x, residual, norm_weight, up, rstd, dtype: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr,
                HAS_RESIDUAL: tl.constexpr):
    """The multiplied input's tile in float32 ([BLOCK_M, BLOCK_K]) from _load_input's tiles."""
    x = _add_residual(x, residual, HAS_RESIDUAL)
    if NORM:
        # The unfused RMSNorm's steps: normalize in float32, round, scale by the weight (rounded).
        x = (x.to(tl.float32) * rstd).to(dtype) * norm_weight[None, :]
    if GATED:
        gate = x.to(tl.float32)
        # Rounded once to the input dtype, as the compiled silu_and_mul does (eager rounds twice).
        x = (gate / (1.0 + tl.exp(-gate)) * up.to(tl.float32)).to(dtype)
    return x.to(tl.float32)


@triton.jit
def _row_rstd(x_ptr, residual_ptr, residual_out_ptr, rows, row_mask, K, stride_x, eps,
              NORM_BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """1 / rms of each row of x (+ residual) ([BLOCK_M, 1]); the first program also writes x + residual,
    the next layer's residual. Every program needs whole rows: NORM_BLOCK spans K at Qwen3's widths, so
    this is one round trip to L2."""
    squares = tl.zeros([rows.shape[0]], tl.float32)
    for k_start in range(0, K, NORM_BLOCK):
        ks = k_start + tl.arange(0, NORM_BLOCK)
        offsets = rows[:, None] * stride_x + ks[None, :]
        mask = row_mask[:, None] & (ks < K)[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x = _add_residual(x, tl.load(residual_ptr + offsets, mask=mask, other=0.0), True)
            if tl.program_id(0) == 0:
                tl.store(residual_out_ptr + offsets, x, mask=mask)
        squares += tl.sum(x.to(tl.float32) * x.to(tl.float32), 1)
    return tl.rsqrt(squares / K + eps)[:, None]


@triton.jit(do_not_specialize=["num_rows"])
def _gemv_kernel(x_ptr, w_ptr, y_ptr, num_rows, N, K, stride_x, stride_w, stride_y,
                 residual_ptr, residual_out_ptr, norm_weight_ptr, eps,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM_BLOCK: tl.constexpr,
                 GATED: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    feature_mask = features < N
    release_next(PDL)
    # No kernel writes the weights: their first tile streams in while the previous kernel finishes.
    w = _load_weight(w_ptr, features, feature_mask, stride_w, 0, K, BLOCK_K)  # [BLOCK_N, BLOCK_K]
    wait_for_previous(PDL)
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    rstd = tl.full([BLOCK_M, 1], 1.0, tl.float32)
    if NORM:
        rstd = _row_rstd(x_ptr, residual_ptr, residual_out_ptr, rows, row_mask, K, stride_x, eps, NORM_BLOCK,
                         HAS_RESIDUAL)
    x, residual, norm_weight, up = _load_input(x_ptr, residual_ptr, norm_weight_ptr, rows, row_mask, 0, K, stride_x,
                                               BLOCK_K, GATED, NORM, HAS_RESIDUAL)
    # Products accumulate elementwise; the sum across threads runs once, after the loop, not per tile.
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    for k_start in range(BLOCK_K, K, BLOCK_K):
        # The next tiles' loads go out before this tile's arithmetic: two tiles in flight per program.
        next_w = _load_weight(w_ptr, features, feature_mask, stride_w, k_start, K, BLOCK_K)
        next_x, next_residual, next_norm_weight, next_up = _load_input(
            x_ptr, residual_ptr, norm_weight_ptr, rows, row_mask, k_start, K, stride_x, BLOCK_K, GATED, NORM,
            HAS_RESIDUAL)
        tile = _input_tile(x, residual, norm_weight, up, rstd, w.dtype, GATED, NORM, HAS_RESIDUAL)
        acc += tile[:, None, :] * w.to(tl.float32)[None, :, :]
        w, x, residual, norm_weight, up = next_w, next_x, next_residual, next_norm_weight, next_up
    tile = _input_tile(x, residual, norm_weight, up, rstd, w.dtype, GATED, NORM, HAS_RESIDUAL)
    acc += tile[:, None, :] * w.to(tl.float32)[None, :, :]
    tl.store(y_ptr + rows[:, None] * stride_y + features[None, :], tl.sum(acc, 2).to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & feature_mask[None, :])


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` serves this product: a CUDA batch of 1 to MAX_ROWS rows, one floating dtype, rows
    of unit stride, and a weight the kernel's int32 offsets can address."""
    return (x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and weight.dtype == x.dtype
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and x.stride(1) == 1
            and weight.stride(1) == 1 and weight.shape[0] * weight.stride(0) < 2 ** 31)


def _config(n: int, k: int, norm: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for a weight [n, k], with the norm in front or not: close to the
    best of a search on an H200 at Qwen3's shapes (scripts/probe_gemv.py --search, BENCHMARKS.md).
    Few outputs (n <= 2048): four per program and long tiles, or the GPU would be mostly idle. Else
    more outputs per program as n grows, in 512-wide tiles, or 256-wide ones when the norm's pass over
    the row comes first with more than four outputs, which leaves fewer registers to the tiles."""
    if n <= 2048:
        return 4, min(2048, triton.next_power_of_2(k)), 8
    block_n = 16 if n >= 16384 else 8 if n >= 6144 or not norm else 4
    return block_n, 256 if norm and block_n > 4 else 512, 8 if block_n == 16 else 4


def _launch(x: torch.Tensor, weight: torch.Tensor, gated: bool, residual: torch.Tensor | None = None,
            residual_out: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
            eps: float = 0.0, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    num_rows = x.shape[0]
    n, k = weight.shape
    y = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    norm = norm_weight is not None
    block_n, block_k, num_warps = config or _config(n, k, norm)
    pdl = pdl_enabled(x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, y, num_rows, n, k, x.stride(0), weight.stride(0), y.stride(0), residual, residual_out,
        norm_weight, eps, BLOCK_M=triton.next_power_of_2(num_rows), BLOCK_N=block_n, BLOCK_K=block_k,
        NORM_BLOCK=min(4096, triton.next_power_of_2(k)), GATED=gated, NORM=norm, HAS_RESIDUAL=residual is not None,
        PDL=pdl, num_warps=num_warps, launch_pdl=pdl,
    )
    return y


def gemv(x: torch.Tensor, weight: torch.Tensor, gated: bool = False,
         config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x: [M, K] (or [M, 2K] gate | up when gated), M <= MAX_ROWS; weight: [N, K] -> [M, N].
    config: (BLOCK_N, BLOCK_K, num_warps), by default _config's (scripts/probe_gemv.py tries others)."""
    assert x.stride(1) == 1 and x.shape[1] == (2 * weight.shape[1] if gated else weight.shape[1])
    return _launch(x, weight, gated, config=config)


def norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
              weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) W^T, x + residual) in one launch, as ops.norm_linear; residual None: no add.
    x, residual: [M, K] contiguous, M <= MAX_ROWS; norm_weight: [K]; weight: [N, K]."""
    assert x.is_contiguous() and x.shape[1] == weight.shape[1] == norm_weight.shape[0]
    if residual is None:
        return _launch(x, weight, False, norm_weight=norm_weight, eps=eps), x
    assert residual.is_contiguous() and residual.shape == x.shape
    # A new tensor: other programs still read the old residual while the first writes the sum.
    residual_out = torch.empty_like(x)
    return _launch(x, weight, False, residual, residual_out, norm_weight, eps), residual_out
