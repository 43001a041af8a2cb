"""bench.py's workload at a small size, for a quick check on any machine:
32 requests, prompts of 100-256 tokens, outputs of 100-128 tokens, random tiny weights unless given."""
import sys

import bench

if __name__ == "__main__":
    defaults = ["--num-seqs", "32", "--max-input-len", "256", "--max-output-len", "128"]
    args = sys.argv[1:]
    if "--model" not in args and "--random-weights" not in args:
        args += ["--random-weights", "tiny"]
    bench.main(defaults + args)
