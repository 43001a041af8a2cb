#!/usr/bin/env bash
# One call on a 2-GPU machine: tensor-parallel GPU tests, the Qwen3-8B TP=1 vs TP=2 benchmarks and the
# data-parallel batch-job benchmark; logs under $OUT, a table last.
set -u
export PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
summary=()
note() { summary+=("$1"); echo "== $1"; }
timeout 200 python3 -m pytest -q -m cuda tests/test_tensor_parallel_cuda.py \
  "tests/test_engine_cuda.py::test_greedy_agrees_with_transformers" > "$OUT/tp_tests.txt" 2>&1
note "cuda tests: $(tail -1 "$OUT/tp_tests.txt")"
grep -E "^E .*(Error|assert)" "$OUT/tp_tests.txt" | head -8
python3 - <<'PY'
import torch
from nanovllm.testing.checkpoints import make_random_checkpoint
from nanovllm.testing.tokenizer import train_tokenizer
make_random_checkpoint("/tmp/qwen3-8b", "qwen3-8b", dtype=torch.bfloat16, device="cuda", std=0.02)
train_tokenizer("/tmp/qwen3-8b")
PY
for tp in 1 2; do
  timeout 150 python3 bench.py --model /tmp/qwen3-8b --tensor-parallel-size $tp > "$OUT/tp${tp}_full.txt" 2>&1
  note "8B TP=$tp full: $(grep -E 'output tok/s|seconds|fraction' "$OUT/tp${tp}_full.txt" | tr -s ' ' | tr '\n' ';')"
  timeout 90 python3 bench.py --model /tmp/qwen3-8b --tensor-parallel-size $tp --num-seqs 1 --input-len 128 \
    --output-len 512 > "$OUT/tp${tp}_single.txt" 2>&1
  note "8B TP=$tp single: $(grep -E 'output tok/s|per output token' "$OUT/tp${tp}_single.txt" | tr -s ' ' | tr '\n' ';')"
done
timeout 170 python3 scripts/bench_data_parallel.py > "$OUT/dp.txt" 2>&1
note "DP: $(tail -6 "$OUT/dp.txt" | tr -s ' ' | tr '\n' ';')"
echo; echo "card: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) x$(nvidia-smi -L | wc -l)  date: $(date -u +%F)"
printf '%s\n' "${summary[@]}"
