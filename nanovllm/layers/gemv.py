"""y = x W^T for a decode batch of a few rows: a Triton kernel that streams W at memory bandwidth.

At one to a few rows a linear layer is a matrix-vector product bound by reading the weight once.
cuBLAS reaches about half the H100's bandwidth there (BENCHMARKS.md: 0.78 ms of a 1.35 ms step for
1.2 GB of weights), and adds a split-K reduction kernel to narrow products. Each program here owns
BLOCK_N output features of every row and walks the whole reduction dimension, so one launch does it all.

`gated=True` takes x = [gate | up] ([M, 2K]) and multiplies by silu(gate) * up, computed while
loading: the MLP's activation needs no kernel of its own. `norm_gemv` applies the add and RMSNorm in
front of a projection the same way, so the norms need no kernels of their own either.
"""
import torch
import triton
import triton.language as tl

from nanovllm.utils.pdl import pdl_enabled, release_next, wait_for_previous

# Rows up to this many use the kernel. Measured on an H200 (scripts/probe_gemv.py, BENCHMARKS.md): at one
# or two rows it matches cuBLAS on wide products and is 1.7-3x faster on the narrow ones (o and down
# projections); from four rows on, each program's [rows, BLOCK_N, BLOCK_K] products cost more than
# cuBLAS's tiles.
MAX_ROWS = 2


@triton.jit
def _load_input(x_ptr, residual_ptr, offsets, mask, HAS_RESIDUAL: tl.constexpr):
    """A tile of x, or of x + residual rounded to x's dtype as the unfused add's output is."""
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + offsets, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _load_weight(w_ptr, features, feature_mask, stride_w, k_start, K, BLOCK_K: tl.constexpr):
    """The [BLOCK_N, BLOCK_K] tile of W at k_start."""
    ks = k_start + tl.arange(0, BLOCK_K)
    return tl.load(w_ptr + features[:, None] * stride_w + ks[None, :],
                   mask=feature_mask[:, None] & (ks < K)[None, :], other=0.0)


@triton.jit
def _tile_product(acc, w, x_ptr, residual_ptr, norm_weight_ptr, rstd, rows, row_mask, k_start, K, stride_x,
                  BLOCK_K: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] + the product of the input's tile at k_start with w, its weight tile."""
    ks = k_start + tl.arange(0, BLOCK_K)
    k_mask = ks < K
    x_offsets = rows[:, None] * stride_x + ks[None, :]
    x_mask = row_mask[:, None] & k_mask[None, :]
    x = _load_input(x_ptr, residual_ptr, x_offsets, x_mask, HAS_RESIDUAL)  # [BLOCK_M, BLOCK_K]
    if NORM:
        # The unfused RMSNorm's steps: normalize in float32, round, scale by the weight (rounded).
        norm_weight = tl.load(norm_weight_ptr + ks, mask=k_mask, other=0.0)
        x = (x.to(tl.float32) * rstd).to(w.dtype) * norm_weight[None, :]
    if GATED:
        gate = x.to(tl.float32)
        up = tl.load(x_ptr + x_offsets + K, mask=x_mask, other=0.0).to(tl.float32)
        # Rounded once to the input dtype, as the compiled silu_and_mul does (eager rounds twice).
        x = (gate / (1.0 + tl.exp(-gate)) * up).to(w.dtype)
    return acc + tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)


@triton.jit(do_not_specialize=["num_rows"])
def _gemv_kernel(x_ptr, w_ptr, y_ptr, num_rows, N, K, stride_x, stride_w, stride_y,
                 residual_ptr, residual_out_ptr, norm_weight_ptr, eps,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr,
                 NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    feature_mask = features < N
    release_next(PDL)
    # No kernel writes the weights: their first tile streams in while the previous kernel finishes.
    first_w = _load_weight(w_ptr, features, feature_mask, stride_w, 0, K, BLOCK_K)  # [BLOCK_N, BLOCK_K]
    wait_for_previous(PDL)
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    rstd = tl.full([BLOCK_M, 1], 1.0, tl.float32)
    if NORM:
        # Every program needs each row's whole norm: a first pass over the row (from L2) sums its
        # squares; the first program also writes x + residual, the next layer's residual.
        squares = tl.zeros([BLOCK_M], tl.float32)
        for k_start in range(0, K, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            offsets = rows[:, None] * stride_x + ks[None, :]
            mask = row_mask[:, None] & (ks < K)[None, :]
            x = _load_input(x_ptr, residual_ptr, offsets, mask, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                if tl.program_id(0) == 0:
                    tl.store(residual_out_ptr + offsets, x, mask=mask)
            squares += tl.sum(x.to(tl.float32) * x.to(tl.float32), 1)
        rstd = tl.rsqrt(squares / K + eps)[:, None]  # [BLOCK_M, 1]
    acc = _tile_product(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), first_w, x_ptr, residual_ptr, norm_weight_ptr,
                        rstd, rows, row_mask, 0, K, stride_x, BLOCK_K, GATED, NORM, HAS_RESIDUAL)
    # The rest as a plain loop, whose loads Triton pipelines.
    for k_start in range(BLOCK_K, K, BLOCK_K):
        w = _load_weight(w_ptr, features, feature_mask, stride_w, k_start, K, BLOCK_K)
        acc = _tile_product(acc, w, x_ptr, residual_ptr, norm_weight_ptr, rstd, rows, row_mask, k_start, K,
                            stride_x, BLOCK_K, GATED, NORM, HAS_RESIDUAL)
    tl.store(y_ptr + rows[:, None] * stride_y + features[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & feature_mask[None, :])


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` serves this product: a CUDA batch of 1 to MAX_ROWS rows, one floating dtype, rows
    of unit stride, and a weight the kernel's int32 offsets can address."""
    return (x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and weight.dtype == x.dtype
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and x.stride(1) == 1
            and weight.stride(1) == 1 and weight.shape[0] * weight.stride(0) < 2 ** 31)


def _config(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for a weight [n, k]. The best on an H200 at Qwen3's shapes:
    1024-wide loads, and two to eight features per program, about n / 1024 (so 512 to 1024 programs)."""
    block_n = max(2, min(8, 1 << max(0, (n // 1024).bit_length() - 1)))
    return block_n, min(1024, triton.next_power_of_2(k)), 4


def _launch(x: torch.Tensor, weight: torch.Tensor, gated: bool, residual: torch.Tensor | None = None,
            residual_out: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
            eps: float = 0.0, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    num_rows = x.shape[0]
    n, k = weight.shape
    y = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    block_n, block_k, num_warps = config or _config(n, k)
    pdl = pdl_enabled(x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, y, num_rows, n, k, x.stride(0), weight.stride(0), y.stride(0), residual, residual_out,
        norm_weight, eps, BLOCK_M=triton.next_power_of_2(num_rows), BLOCK_N=block_n, BLOCK_K=block_k,
        GATED=gated, NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None, PDL=pdl, num_warps=num_warps,
        launch_pdl=pdl,
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
