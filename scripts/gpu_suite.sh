#!/usr/bin/env bash
# One device call: GPU tests, then the benchmarks of BENCHMARKS.md, logs under $OUT (three files, since
# a device call brings back at most eight), a table last.
#   bash scripts/gpu_suite.sh [tests|bench|all]
set -u
export PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
what=${1:-all}
card=$(python3 -c "import torch; print(torch.cuda.get_device_name())")
summary=()
note() { summary+=("$1"); echo "== $1"; }
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -m cuda tests > "$OUT/cuda_tests.txt" 2>&1
  note "cuda tests: $(tail -1 "$OUT/cuda_tests.txt")"
  grep -E "FAILED|Error" "$OUT/cuda_tests.txt" | head -20
fi
bench() {  # name, then bench.py arguments
  local name=$1; shift
  local log=$OUT/bench_$name.log
  python3 bench.py --random-weights qwen3-0.6b "$@" > "$log" 2>&1
  note "$name: $(grep -E 'output tok/s|prompt\+output|fraction|seconds|per output token' "$log" | tr -s ' ' | tr '\n' ';')"
  tail -3 "$log" | grep -iE "error|Traceback" && tail -20 "$log"
  { echo "=== bench $name: $*"; cat "$log"; } >> "$OUT/benches.txt"; rm "$log"
}
if [[ $what == bench || $what == all ]]; then
  bench full
  bench full_filters --top-p 0.9 --top-k 50 --repetition-penalty 1.1
  bench nano64 --num-seqs 64 --output-len 256
  bench hf64 --num-seqs 64 --output-len 256 --backend hf
  bench single --num-seqs 1 --input-len 128 --output-len 512
  bench prefill --num-seqs 64 --input-len 1024 --output-len 1
  python3 scripts/profile_step.py > "$OUT/profile_step.txt" 2>&1
  note "profile: $(tail -7 "$OUT/profile_step.txt" | tr -s ' ' | tr '\n' ';')"
  python3 scripts/profile_kernels.py --batch-sizes 1 256 --top 25 > "$OUT/profile_kernels.txt" 2>&1
  note "kernels: $(grep '^== batch' "$OUT/profile_kernels.txt" | tr '\n' ';')"
  python3 scripts/probe_gemv.py > "$OUT/probe_gemv.txt" 2>&1
  cat "$OUT/profile_step.txt" "$OUT/profile_kernels.txt" "$OUT/probe_gemv.txt" > "$OUT/profiles.txt"
  rm "$OUT/profile_step.txt" "$OUT/profile_kernels.txt" "$OUT/probe_gemv.txt"
fi
echo; echo "card: $card  date: $(date -u +%F)"
printf '%s\n' "${summary[@]}"
