"""Time the Triton attention kernels at Qwen3-0.6B attention shapes (H=16, Hkv=8, D=128, bf16), or others.

Decode is bound by reading the KV cache, so it is reported as KV bytes read per second against a
device-to-device copy measured in the same run. It is timed as CUDA-graph replays, as the engine runs
it: otherwise the host cost of launching two Triton kernels (~100 us) hides a small batch's kernel time.
One graph runs the kernel over enough distinct caches (1 GiB in all) that none is still in L2 when read,
which also spreads the cost of do_bench's L2 flush (its dirty lines are written back during the next
kernel, ~12 us) over many calls. Prefill is reported in tokens/s and TFLOP/s against a
large bf16 matrix product. Block tables are random permutations, as a long-running cache ends up.

    PYTHONPATH=. python3 scripts/probe_attention.py
    PYTHONPATH=. python3 scripts/probe_attention.py --heads 16 --kv-heads 4 --cases 64x512 128x512 --decode-only
        (Qwen3-8B's heads on each of two tensor-parallel ranks: only the decode split sweep, at these cases)
"""
import argparse
import itertools

import torch
import triton
from triton.testing import do_bench

from nanovllm.attention.triton_kernels import choose_num_splits, paged_decode_attention, paged_prefill_attention
from nanovllm.attention.triton_kernels.decode import DEFAULT_LAUNCH, DecodeLaunch, choose_launch

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE = 16, 8, 128, torch.bfloat16
DECODE_CASES = [(256, 850), (8, 4000), (1, 4000), (1, 640)]  # (sequences, context tokens); (1, 640): one request
BLOCK_SIZES = [256, 16]
SWEEP_CASES = DECODE_CASES[1:]  # the split sweep's
DECODE_ONLY = False
STAGES: list[int] = []  # --stages: also sweep the decode kernel's launch: pipeline stages (with --tile-bytes, --warps)
TILE_BYTES: list[int] = []
WARPS: list[int] = []
PREFILL_SEQS, PREFILL_LEN = 64, 1024


def median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def graph_of(fn) -> torch.cuda.CUDAGraph:
    fn()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def copy_bandwidth() -> float:
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * src.nbytes / (median_ms(lambda: dst.copy_(src)) * 1e-3)  # bytes read + written


def matmul_flops() -> float:
    a, b = torch.randn(8192, 8192, dtype=DTYPE, device="cuda"), torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    return 2 * 8192 ** 3 / (median_ms(lambda: a @ b) * 1e-3)


def paged_cache(num_seqs: int, context_len: int, block_size: int):
    """Random caches [num_blocks, block_size, Hkv, D] and a random permuted block table [B, M]."""
    blocks_per_seq = triton.cdiv(context_len, block_size)
    num_blocks = num_seqs * blocks_per_seq
    k_cache = torch.randn(num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.randperm(num_blocks, device="cuda").view(num_seqs, blocks_per_seq).int()
    context_lens = torch.full((num_seqs,), context_len, dtype=torch.int32, device="cuda")
    return k_cache, v_cache, block_tables, context_lens


def decode_bandwidth(num_seqs: int, context_len: int, block_size: int, num_splits: int | None,
                     launch: DecodeLaunch | None = None) -> tuple[float, float]:
    """-> (KV bytes read per second, median ms per call); num_splits and launch as paged_decode_attention's."""
    kv_bytes = 2 * num_seqs * context_len * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    caches = [paged_cache(num_seqs, context_len, block_size) for _ in range(triton.cdiv(1 << 30, kv_bytes))]
    q = torch.randn(num_seqs, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")

    def decode_all():
        for k_cache, v_cache, block_tables, context_lens in caches:
            paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, HEAD_DIM ** -0.5, num_splits,
                                   launch=launch)

    ms = median_ms(graph_of(decode_all).replay) / len(caches)
    return kv_bytes / (ms * 1e-3), ms


def prefill_throughput(block_size: int) -> tuple[float, float, float]:
    """-> (tokens/s, FLOP/s, median ms) for PREFILL_SEQS fresh prompts of PREFILL_LEN tokens."""
    k_cache, v_cache, block_tables, context_lens = paged_cache(PREFILL_SEQS, PREFILL_LEN, block_size)
    num_tokens = PREFILL_SEQS * PREFILL_LEN
    q = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    cu_seqlens_q = torch.arange(0, num_tokens + 1, PREFILL_LEN, dtype=torch.int32, device="cuda")
    ms = median_ms(lambda: paged_prefill_attention(q, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q,
                                                   PREFILL_LEN, HEAD_DIM ** -0.5))
    # Causal: query i sees i + 1 keys; 2 FLOPs per multiply-add, for Q K^T and for P V.
    flops = 4 * NUM_HEADS * HEAD_DIM * PREFILL_SEQS * PREFILL_LEN * (PREFILL_LEN + 1) // 2
    return num_tokens / (ms * 1e-3), flops / (ms * 1e-3), ms


def main():
    device = torch.cuda.get_device_properties(0)
    copy_bw, mm_flops = copy_bandwidth(), matmul_flops()
    print(f"{device.name}, {device.multi_processor_count} SMs: copy {copy_bw / 1e12:.2f} TB/s, "
          f"bf16 matmul {mm_flops / 1e12:.0f} TFLOP/s")

    tile = DEFAULT_LAUNCH.tile_tokens(HEAD_DIM, DTYPE.itemsize)
    print(f"\ndecode split sweep, {NUM_HEADS} heads, {NUM_KV_HEADS} KV heads (fraction of copy bandwidth; "
          f"* = chosen):")
    for num_seqs, context_len in SWEEP_CASES:
        for block_size in BLOCK_SIZES:
            chosen = choose_num_splits(num_seqs, NUM_KV_HEADS, triton.cdiv(context_len, block_size), block_size,
                                       tile, device.multi_processor_count)
            cells = []
            for num_splits in sorted({1, 2, 4, 8, 16, 32, 64, chosen}):
                bandwidth, ms = decode_bandwidth(num_seqs, context_len, block_size, num_splits)
                # Microseconds too: for one short context the launches, not the bandwidth, set the time.
                cells.append(f"{num_splits}{'*' if num_splits == chosen else ''}: {bandwidth / copy_bw:.0%} "
                             f"{ms * 1e3:.1f}us")
            print(f"  {num_seqs:>3} x {context_len} tokens, block {block_size:>3}: " + "  ".join(cells))

    if STAGES:
        print("\ndecode launch sweep at the chosen splits, stages/tile bytes/warps (* = chosen by choose_launch):")
        for num_seqs, context_len in SWEEP_CASES:
            for block_size in BLOCK_SIZES:
                splits = choose_num_splits(num_seqs, NUM_KV_HEADS, triton.cdiv(context_len, block_size), block_size,
                                           tile, device.multi_processor_count)
                chosen = choose_launch(num_seqs, NUM_KV_HEADS, splits, device.multi_processor_count)
                cells = []
                for stages, tile_bytes, warps in itertools.product(STAGES, TILE_BYTES or [DEFAULT_LAUNCH.tile_bytes],
                                                                   WARPS or [DEFAULT_LAUNCH.num_warps]):
                    launch = DecodeLaunch(tile_bytes, warps, stages)
                    bandwidth, ms = decode_bandwidth(num_seqs, context_len, block_size, None, launch)
                    cells.append(f"{stages}/{tile_bytes}/{warps}{'*' if launch == chosen else ''}: "
                                 f"{bandwidth / copy_bw:.0%} {ms * 1e3:.1f}us")
                print(f"  {num_seqs:>3} x {context_len} tokens, block {block_size:>3}: " + "  ".join(cells))
    if DECODE_ONLY:
        return
    rows = []
    for num_seqs, context_len in DECODE_CASES:
        for block_size in BLOCK_SIZES:
            bandwidth, ms = decode_bandwidth(num_seqs, context_len, block_size, None)
            rows.append(f"decode  {num_seqs:>3} x {context_len:<5} block {block_size:>3} {ms * 1e3:9.1f} us  "
                        f"{bandwidth / 1e12:5.2f} TB/s  {bandwidth / copy_bw:6.1%} of copy")
    for block_size in BLOCK_SIZES:
        tokens_per_s, flops, ms = prefill_throughput(block_size)
        rows.append(f"prefill {PREFILL_SEQS:>3} x {PREFILL_LEN:<5} block {block_size:>3} {ms * 1e3:9.1f} us  "
                    f"{tokens_per_s / 1e6:5.2f} M tok/s  {flops / 1e12:5.0f} TFLOP/s "
                    f"({flops / mm_flops:.0%} of matmul)")
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=NUM_HEADS)
    parser.add_argument("--kv-heads", type=int, default=NUM_KV_HEADS)
    parser.add_argument("--cases", nargs="*", help="split sweep cases, SEQSxCONTEXT (default: the built-in ones)")
    parser.add_argument("--block-sizes", type=int, nargs="*", default=BLOCK_SIZES)
    parser.add_argument("--decode-only", action="store_true", help="only the split sweep (and --stages)")
    parser.add_argument("--stages", type=int, nargs="*", default=[],
                        help="also time these pipeline stage counts for the decode kernel, at the chosen splits")
    parser.add_argument("--tile-bytes", type=int, nargs="*", default=[], help="with --stages: K/V tile sizes")
    parser.add_argument("--warps", type=int, nargs="*", default=[], help="with --stages: warps per program")
    args = parser.parse_args()
    NUM_HEADS, NUM_KV_HEADS, BLOCK_SIZES, DECODE_ONLY = args.heads, args.kv_heads, args.block_sizes, args.decode_only
    STAGES, TILE_BYTES, WARPS = args.stages, args.tile_bytes, args.warps
    SWEEP_CASES = ([tuple(map(int, case.split("x"))) for case in args.cases] if args.cases else DECODE_CASES[1:])
    main()
