"""Time one all-reduce on two GPUs, NCCL against the peer all-reduce (utils/peer_all_reduce.py), at the
sizes tensor-parallel Qwen3 sends: one row of hidden states per sequence (bf16; nan: too large for the
peer all-reduce, which leaves it to NCCL). Each is timed as a CUDA
graph of 20 all-reduces back to back, as decode runs them; rank 0 prints microseconds per all-reduce,
then for the all-reduce with the decoder's add and RMSNorm (all_reduce_norm) at Qwen3-8B's width.
--grids also times both peer kernels on 256 rows of 4096 with other caps on their programs, and the
last line is NCCL's bus bandwidth for 64 MiB (a reading of the link between the GPUs). --norm-only
times all_reduce_norm alone (at --norm-rows); a probe whose every all-reduce takes hundreds of us
is the stall that HOST_CHECK_NS's comment describes.

    PYTHONPATH=. python3 scripts/probe_all_reduce.py [--grids 64 132 512] [--norm-only] [--norm-rows 64 256]
"""
import argparse
import socket

import torch
import torch.distributed as dist

from nanovllm.utils.distributed import create_group, open_store

ROWS = [1, 2, 16, 64, 128, 256, 512]
HIDDEN = [1024, 4096]  # Qwen3-0.6B, Qwen3-8B
REPEATS = 20
NORM_HIDDEN = 4096  # all_reduce_norm at Qwen3-8B's width


def time_graph(fn, slowest: bool = False) -> float | tuple[float, float]:
    """Microseconds per call of fn, from a graph of REPEATS calls: the median of 20 replays (and the
    slowest replay's, if asked)."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPEATS):
            fn()
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / REPEATS)
    times = sorted(times[5:])
    return (times[len(times) // 2], times[-1]) if slowest else times[len(times) // 2]


def rank_main(rank: int, port: int, grids: list[int], norm_only: bool, norm_rows: list[int]) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    group = create_group(open_store(rank, 2, port), rank, 2, device)
    if rank == 0:
        print(f"{torch.cuda.get_device_name(device)} x 2; peer all-reduce: {group.peer is not None}")
    if rank == 0 and not norm_only:
        print(f"{'rows x hidden':>14} {'bytes':>9} {'NCCL us':>8} {'peer us':>8} {'slowest':>8}")
    for hidden in [] if norm_only else HIDDEN:
        for rows in ROWS:
            x = torch.zeros(rows, hidden, dtype=torch.bfloat16, device=device)  # stays finite when summed in place
            nccl = time_graph(lambda: dist.all_reduce(x, group=group.group))
            fits = group.peer is not None and group.peer.fits(x)
            peer, slowest = time_graph(lambda: group.peer.all_reduce(x), slowest=True) if fits else (float("nan"),) * 2
            if rank == 0:
                print(f"{rows:>5} x {hidden:<6} {x.numel() * 2:>9} {nccl:>8.1f} {peer:>8.1f} {slowest:>8.1f}")
    if group.peer is not None:  # the all-reduce that decode's large batches take, with the add and norm after it
        weight = torch.ones(NORM_HIDDEN, dtype=torch.bfloat16, device=device)
        for rows in norm_rows:
            x = torch.zeros(rows, NORM_HIDDEN, dtype=torch.bfloat16, device=device)
            residual = torch.zeros_like(x)
            assert group.peer.fits_norm(x, residual, weight)
            norm, slowest = time_graph(lambda: group.peer.all_reduce_norm(x, residual, weight, 1e-6), slowest=True)
            if rank == 0:
                print(f"all_reduce_norm {rows:>4} x {NORM_HIDDEN}: {norm:.1f} us (slowest replay {slowest:.1f})")
        import nanovllm.utils.peer_all_reduce as peer_module
        x = torch.zeros(256, 4096, dtype=torch.bfloat16, device=device)
        residual = torch.zeros_like(x)
        for grid in grids:
            peer_module.MAX_GRID = grid
            peer = time_graph(lambda: group.peer.all_reduce(x))
            norm = time_graph(lambda: group.peer.all_reduce_norm(x, residual, weight, 1e-6))
            if rank == 0:
                print(f"256 x 4096 with at most {grid} programs: all_reduce {peer:.1f} us, all_reduce_norm {norm:.1f} us")
    if not norm_only:
        big = torch.zeros(32 * 2**20, dtype=torch.bfloat16, device=device)
        seconds = time_graph(lambda: dist.all_reduce(big, group=group.group)) / 1e6
        if rank == 0:  # bus bandwidth as nccl-tests defines it, 2 (n - 1) / n x bytes / time: at n = 2, bytes / time
            print(f"NCCL all-reduce of 64 MiB: {seconds * 1e6:.0f} us, bus bandwidth {big.numel() * 2 / seconds / 1e9:.0f} GB/s")
    group.shutdown(device)


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grids", type=int, nargs="*", default=[])
    parser.add_argument("--norm-only", action="store_true", help="time all_reduce_norm alone")
    parser.add_argument("--norm-rows", type=int, nargs="*", default=[16, 64, 128, 256, 512])
    args = parser.parse_args()
    torch.multiprocessing.spawn(rank_main, args=(free_port, args.grids, args.norm_only, args.norm_rows), nprocs=2,
                                join=True)
