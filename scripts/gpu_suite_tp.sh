#!/usr/bin/env bash
# One call on a 2-GPU machine: tensor-parallel GPU tests, the Qwen3-8B TP=1 vs TP=2 benchmarks and the
# data-parallel batch-job benchmark, inside a time budget (BUDGET seconds, default 570); logs under $OUT,
# a table last. Every Python process prints its stacks every STACKS_EVERY_S seconds, so a hang shows where.
set -u
export PYTHONPATH=$PWD:$PWD/scripts/debug_site NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export STACKS_EVERY_S=${STACKS_EVERY_S:-100}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-570}
summary=()
note() { summary+=("$1"); echo "== $1 (t=${SECONDS}s)"; }
# limited LIMIT LOG CMD...: run CMD with a timeout of min(LIMIT, what the budget has left), or skip it.
limited() {
  local limit=$1 log=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < 30)); then echo "skipped: budget spent" > "$log"; return 124; fi
  timeout $((limit < left ? limit : left)) "$@" > "$log" 2>&1
}
nvidia-smi -L; free -g | head -2
limited 240 "$OUT/tp_tests.txt" python3 -m pytest -q -x -m cuda tests/test_tensor_parallel_cuda.py \
  -o log_cli=true --log-cli-level=INFO --durations=5
tp_ok=$?
note "TP cuda tests (rc $tp_ok): $(grep -E 'passed|failed|error' "$OUT/tp_tests.txt" | tail -1)"
grep -E "^E .*(Error|assert)|captured in|loaded in|warm-up" "$OUT/tp_tests.txt" | head -12
if ((tp_ok == 0)); then
  limited 90 "$OUT/make_8b.txt" python3 - <<'PY'
import torch
from nanovllm.testing.checkpoints import make_random_checkpoint
from nanovllm.testing.tokenizer import train_tokenizer
make_random_checkpoint("/tmp/qwen3-8b", "qwen3-8b", dtype=torch.bfloat16, device="cuda", std=0.02)
train_tokenizer("/tmp/qwen3-8b")
PY
  for tp in 2 1; do
    limited 120 "$OUT/tp${tp}_single.txt" python3 bench.py --model /tmp/qwen3-8b --tensor-parallel-size $tp \
      --num-seqs 1 --input-len 128 --output-len 512
    note "8B TP=$tp single: $(grep -E 'output tok/s|per output token|start-up' "$OUT/tp${tp}_single.txt" | tr -s ' ' | tr '\n' ';')"
  done
  for tp in 2 1; do
    limited 150 "$OUT/tp${tp}_full.txt" python3 bench.py --model /tmp/qwen3-8b --tensor-parallel-size $tp
    note "8B TP=$tp full: $(grep -E 'output tok/s|seconds|fraction' "$OUT/tp${tp}_full.txt" | tr -s ' ' | tr '\n' ';')"
  done
fi
limited 240 "$OUT/dp.txt" python3 scripts/bench_data_parallel.py
note "DP: $(tail -4 "$OUT/dp.txt" | tr -s ' ' | tr '\n' ';')"
echo; echo "card: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) x$(nvidia-smi -L | wc -l)  date: $(date -u +%F)"
printf '%s\n' "${summary[@]}"
