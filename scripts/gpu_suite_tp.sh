#!/usr/bin/env bash
# One call on a 2-GPU machine, inside a time budget (BUDGET seconds, default 560); logs under $OUT, a table last.
#   bash scripts/gpu_suite_tp.sh [dp] [smoke] [probe] [tests] [gpu1tests] [bench8b] [full8b] [profile8b]
#   (default: dp smoke tests gpu1tests bench8b full8b; they run in this order)
# dp: the data-parallel batch-job benchmark; smoke: tensor parallelism step by step (scripts/tp_smoke.py);
# probe: NCCL against the peer all-reduce (scripts/probe_all_reduce.py, with --grids $PROBE_GRIDS if set; if it fails, the later parts run
# with NANOVLLM_PEER_ALL_REDUCE=0); tests: the tensor-parallel GPU tests (TP_TESTS: a -k expression);
# gpu1tests: the one-GPU engine and memory tests; bench8b: Qwen3-8B TP=1 vs TP=2, single request; profile8b:
# rank 0's kernels per decode step of Qwen3-8B at TP=2 (PROFILE_TPS, default 2), at 1 and 256 sequences
# (PROFILE_BATCHES; collectives included; PROFILE_TRACE=1 also saves gzipped Chrome traces under $OUT);
# full8b: Qwen3-8B TP=1 vs TP=2, the full workload (FULL_ROUNDS=N: both N times in turn, then each round's
# ratio and their mean; AB_ENVS="A=1 B=2;C=3": TP=2 again under each).
# All but dp and probe run only if the smoke run passed.
# STACKS_EVERY_S=N: every Python process prints its stacks every N seconds, so a hang shows where (off by
# default: faulthandler walks a running thread's frames, and one such dump crashed a TP=2 start-up with a
# segmentation fault while the main thread compiled Triton kernels).
set -u
export PYTHONPATH=$PWD:$PWD/scripts/debug_site NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-570}
parts=" ${*:-dp smoke tests gpu1tests bench8b full8b} "
summary=()
note() { summary+=("$1"); echo "== $1 (t=${SECONDS}s)"; }
# bench_numbers LOG: bench.py's result rows on one line (not the engine's log lines that mention prefill or decode).
bench_numbers() {
  grep -E '^ +(seconds|output tok/s|(prefill|decode|gc pause|start-up) seconds|ms per output token): ' "$1" \
    | tr -s ' ' | tr '\n' ';'
}
# limited LIMIT LOG CMD...: run CMD with a timeout of min(LIMIT, what the budget has left), or skip it.
limited() {
  local limit=$1 log=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < 30)); then echo "skipped: budget spent" > "$log"; return 124; fi
  timeout $((limit < left ? limit : left)) "$@" > "$log" 2>&1
}
nvidia-smi -L
if [[ $parts == *" dp "* ]]; then
  limited 200 "$OUT/dp.txt" python3 scripts/bench_data_parallel.py
  note "DP (rc $?): $(grep -v INFO "$OUT/dp.txt" | tail -4 | tr -s ' ' | tr '\n' ';')"
fi
smoke_ok=0  # tests and bench8b need a passing smoke run only when it is asked for
if [[ $parts == *" smoke "* ]]; then
  limited 150 "$OUT/tp_smoke.txt" python3 scripts/tp_smoke.py
  smoke_ok=$?
  note "TP smoke (rc $smoke_ok): $(grep -E '^[0-9:]{8} ' "$OUT/tp_smoke.txt" | tail -3 | tr '\n' ';')"
  ((smoke_ok == 0)) || grep -v "^INFO\|nanovllm.engine.model_runner" "$OUT/tp_smoke.txt" | tail -60
fi
if [[ $parts == *" probe "* ]]; then
  limited 90 "$OUT/probe_all_reduce.txt" python3 scripts/probe_all_reduce.py ${PROBE_GRIDS:+--grids $PROBE_GRIDS}
  probe_rc=$?
  # A failing peer all-reduce would take every later part down with it: they run on NCCL alone then.
  ((probe_rc == 0)) || export NANOVLLM_PEER_ALL_REDUCE=0
  note "all-reduce probe (rc $probe_rc; peer all-reduce ${NANOVLLM_PEER_ALL_REDUCE:-on})"
  grep -v "INFO\|WARN" "$OUT/probe_all_reduce.txt" | tail -24
fi
if [[ $parts == *" tests "* ]] && ((smoke_ok == 0)); then
  limited 220 "$OUT/tp_tests.txt" python3 -m pytest -q -s -x -m cuda tests/test_tensor_parallel_cuda.py \
    -o faulthandler_timeout=0 --durations=5 ${TP_TESTS:+-k "$TP_TESTS"}
  note "TP cuda tests (rc $?): $(grep -E 'passed|failed|error' "$OUT/tp_tests.txt" | tail -1)"
  grep -E "^E .*(Error|assert)" "$OUT/tp_tests.txt" | head -12
fi
if [[ $parts == *" gpu1tests "* ]]; then
  limited 150 "$OUT/gpu1_tests.txt" python3 -m pytest -q -m cuda tests/test_engine_cuda.py tests/test_memory_cuda.py
  note "one-GPU engine tests (rc $?): $(tail -1 "$OUT/gpu1_tests.txt")"
  grep -E "^E .*(Error|assert)" "$OUT/gpu1_tests.txt" | head -8
fi
if [[ $parts =~ " "(bench8b|full8b|profile8b)" " ]] && ((smoke_ok == 0)) && [[ ! -d /tmp/qwen3-8b ]]; then
  limited 90 "$OUT/make_8b.txt" python3 - <<'PY'
import torch
from nanovllm.testing.checkpoints import make_random_checkpoint
from nanovllm.testing.tokenizer import train_tokenizer
make_random_checkpoint("/tmp/qwen3-8b", "qwen3-8b", dtype=torch.bfloat16, device="cuda", std=0.02)
train_tokenizer("/tmp/qwen3-8b")
PY
fi
if [[ $parts == *" bench8b "* ]] && ((smoke_ok == 0)); then
  for tp in 2 1; do
    limited 120 "$OUT/tp${tp}_single.txt" python3 bench.py --model /tmp/qwen3-8b --tensor-parallel-size $tp \
      --num-seqs 1 --input-len 128 --output-len 512
    note "8B TP=$tp single: $(bench_numbers "$OUT/tp${tp}_single.txt")"
  done
fi
if [[ $parts == *" full8b "* ]] && ((smoke_ok == 0)); then
  for round in $(seq "${FULL_ROUNDS:-1}"); do  # TP=2 and TP=1 in turn, so drift within the call hits both
    for tp in 2 1; do
      limited 150 "$OUT/tp${tp}_full_r$round.txt" python3 bench.py --model /tmp/qwen3-8b --tensor-parallel-size $tp
      note "8B TP=$tp full, round $round: $(bench_numbers "$OUT/tp${tp}_full_r$round.txt")"
      if [[ $tp == 2 && $round == 1 && -n ${AB_ENVS:-} ]]; then  # the same run under each of AB_ENVS
        IFS=';' read -ra variants <<< "$AB_ENVS"
        for i in "${!variants[@]}"; do
          limited 150 "$OUT/tp2_full_ab$i.txt" env ${variants[$i]} python3 bench.py --model /tmp/qwen3-8b \
            --tensor-parallel-size 2
          note "8B TP=2 full, ${variants[$i]}: $(bench_numbers "$OUT/tp2_full_ab$i.txt")"
        done
      fi
    done
  done
  note "8B full, TP=2 / TP=1 output tok/s: $(python3 - "$OUT" "${FULL_ROUNDS:-1}" <<'PY'
import re, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def tok_s(tp, r):
    found = re.findall(r"output tok/s: *([0-9.]+)", open(f"{out}/tp{tp}_full_r{r}.txt").read())
    return float(found[-1]) if found else None
pairs = [(tok_s(2, r), tok_s(1, r)) for r in range(1, rounds + 1)]
ratios = [two / one for two, one in pairs if two and one]
print(" ".join(f"{x:.3f}x" for x in ratios) + (f"; mean {sum(ratios) / len(ratios):.3f}x" if ratios else "none"))
PY
)"
fi
if [[ $parts == *" profile8b "* ]] && ((smoke_ok == 0)); then
  for tp in ${PROFILE_TPS:-2}; do
    limited 150 "$OUT/profile8b_tp$tp.txt" python3 scripts/profile_kernels.py --model /tmp/qwen3-8b \
      --tensor-parallel-size $tp --batch-sizes ${PROFILE_BATCHES:-1 256} --top 20 \
      ${PROFILE_TRACE:+--trace $OUT}
    note "8B TP=$tp kernels: $(grep '^== batch' "$OUT/profile8b_tp$tp.txt" | tr '\n' ';')"
  done
fi
echo; echo "card: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) x$(nvidia-smi -L | wc -l)  date: $(date -u +%F)"
printf '%s\n' "${summary[@]}"
