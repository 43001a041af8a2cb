"""When the GPU ran no kernel, was the host late? Reads a gzipped Chrome trace from
`scripts/profile_kernels.py --trace DIR` and prints, for each gap between kernels longer than
--min-gap us, the kernels around it and when rank 0's host launched the one after it, relative to the
start of the gap: a launch after the gap began means the GPU waited for the host; one long before it
means the device itself took the time.

    python scripts/trace_gaps.py DIR/trace_tp2_batch64.json.gz [--min-gap 4]
"""
import argparse
import gzip
import json

from profile_kernels import gaps_between  # this directory

DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace")
    p.add_argument("--min-gap", type=float, default=4.0, help="microseconds")
    args = p.parse_args()
    events = [e for e in json.load(gzip.open(args.trace))["traceEvents"] if e.get("ph") == "X"]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    kernels = [(e["ts"], e["ts"] + e["dur"], e) for e in events if e.get("cat") in DEVICE_WORK]
    gaps = []
    for idle_from, length, before, after in gaps_between(kernels):
        if length > args.min_gap:
            launch = launches.get(after["args"].get("correlation"))
            launched = f"{launch['name']} at {launch['ts'] - idle_from:+.1f} us" if launch else "launch not traced"
            gaps.append(f"{length:8.1f} us  {before['name'][:50]} -> {after['name'][:50]}\n{'':13}{launched}")
    print(f"{len(gaps)} gaps longer than {args.min_gap} us")
    print("\n".join(gaps))


if __name__ == "__main__":
    main()
