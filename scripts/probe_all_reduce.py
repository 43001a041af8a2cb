"""Time one all-reduce on two GPUs, NCCL against the peer all-reduce (utils/peer_all_reduce.py), at the
sizes tensor-parallel Qwen3 sends: one row of hidden states per sequence (bf16; nan: too large for the
peer all-reduce, which leaves it to NCCL). Each is timed as a CUDA
graph of 20 all-reduces back to back, as decode runs them; rank 0 prints microseconds per all-reduce.

    PYTHONPATH=. python3 scripts/probe_all_reduce.py
"""
import socket

import torch
import torch.distributed as dist

from nanovllm.utils.distributed import create_group, open_store

ROWS = [1, 2, 16, 64, 256, 512]
HIDDEN = [1024, 4096]  # Qwen3-0.6B, Qwen3-8B
REPEATS = 20


def time_graph(fn) -> float:
    """Microseconds per call of fn, from a graph of REPEATS calls (median of 20 replays)."""
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
    return sorted(times[5:])[len(times[5:]) // 2]


def rank_main(rank: int, port: int) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    group = create_group(open_store(rank, 2, port), rank, 2, device)
    if rank == 0:
        print(f"{torch.cuda.get_device_name(device)} x 2; peer all-reduce: {group.peer is not None}")
        print(f"{'rows x hidden':>14} {'bytes':>9} {'NCCL us':>8} {'peer us':>8}")
    for hidden in HIDDEN:
        for rows in ROWS:
            x = torch.zeros(rows, hidden, dtype=torch.bfloat16, device=device)  # stays finite when summed in place
            nccl = time_graph(lambda: dist.all_reduce(x, group=group.group))
            fits = group.peer is not None and group.peer.fits(x)
            peer = time_graph(lambda: group.peer.all_reduce(x)) if fits else float("nan")  # NCCL's
            if rank == 0:
                print(f"{rows:>5} x {hidden:<6} {x.numel() * 2:>9} {nccl:>8.1f} {peer:>8.1f}")
    group.shutdown(device)


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    torch.multiprocessing.spawn(rank_main, args=(free_port,), nprocs=2, join=True)
