#!/usr/bin/env bash
# The one command for a lent GPU machine (one H200, 16 cores, ~15 minutes in all with its start;
# one command at most 10 minutes; at most 8 files come back; nothing can be installed there).
#   run:      bash benchmarks/gpu_suite.sh                        (results in $OUT)
#   dry run:  GPU_SUITE_DRY_RUN=1 OUT=/tmp/gpu bash benchmarks/gpu_suite.sh   (CPU, tiny sizes; CI runs it)
#
# Phases in priority order, each time-boxed inside one overall budget (GPU_SUITE_BUDGET_S, default
# 450 s: under 8 minutes wall), so that what finished comes back even when a later phase runs long:
#   env -> build (sm_90 only, all cores) -> triton-warm (every Triton variant compiled, in parallel)
#   -> tests (CUDA-only tests and every backend's CUDA parametrisation: pytest -m gpu)
#   -> bench (the zoo on CUDA: CUDA events, L2 overwritten per sample, copy bandwidth as the limit)
#   -> groups (benchmarks/groups.py: K averages in one pass against K Averagers and K of each peer)
#   -> pytest-benchmark on CUDA, if time remains.
# Files in $OUT (at most 8): summary.md (rewritten after every phase: passed/failed/skipped, the
# benchmark table, the environment), gpu-bench-*.json (+ .png), gpu-groups.json, pytest-benchmark.json, logs.tar.gz
# (every log and the JUnit XML). Uses the image's own torch, triton, setuptools and ninja: no pip.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-run}
PY=${PYTHON:-python3}
DRY=${GPU_SUITE_DRY_RUN:-0}
BUDGET=${GPU_SUITE_BUDGET_S:-450}
mkdir -p "$OUT"
LOGS=$(mktemp -d)
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
[ "$DRY" = 1 ] && echo "GPU_SUITE_DRY_RUN=1: the phases on the CPU with tiny sizes" | tee "$LOGS/dry-run.txt"

# phase NAME LIMIT_S COMMAND...: run with a time box of LIMIT_S, cut to what the budget has left;
# log to $LOGS/NAME.log, record (name, exit status, seconds), then refresh summary.md and the archive.
phase() {
  local name=$1 limit=$2 left rc t0
  shift 2
  left=$((BUDGET - ($(date +%s) - START)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    echo "$name skipped 0" >> "$LOGS/phases.txt"
    echo "== $name: skipped (budget spent)"
  else
    echo "== $name (up to ${limit}s)"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    echo "$name $rc $(($(date +%s) - t0))" >> "$LOGS/phases.txt"
    tail -n 4 "$LOGS/$name.log"
    echo "== $name: exit $rc after $(($(date +%s) - t0))s"
  fi
  $PY benchmarks/gpu_summary.py "$LOGS" "$OUT" > "$OUT/summary.md" 2> "$LOGS/summary-errors.log"
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .
}

if [ "$DRY" = 1 ]; then
  ARCH_ENV=(WAVG_FUSED_BUILD_CUDA=0)
  BUILD_OUT=(--build-temp "$(mktemp -d)" --build-lib "$(mktemp -d)")  # leave the tree's build alone
  DEVICE=cpu
  SMALL=2000x1k LARGE=2000x1k REPEATS=3 BENCH_MODELS=2000x1k VARIANTS_SMALL=fp32 VARIANTS_LARGE=bf16/fp32
  GROUP_MODELS=2000x1k GROUP_MEMBERS=2
else
  ARCH_ENV=(WAVG_FUSED_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 WAVG_FUSED_PTXAS_VERBOSE=1)
  BUILD_OUT=(--inplace)
  DEVICE=cuda
  SMALL=2000x1k,resnet50 LARGE=vit_b16,gpt2,llama_1b3 REPEATS=30 BENCH_MODELS=2000x1k,resnet50,gpt2
  VARIANTS_SMALL=fp32,bf16/fp32 VARIANTS_LARGE=fp32,bf16/fp32
  GROUP_MODELS="2000x1k resnet50 gpt2" GROUP_MEMBERS="2 3"
fi
# The tests check that the compiled backends were really built (they skip nothing silently).
export WAVG_FUSED_EXPECT_EXT=1

phase env 30 bash -c "(nvidia-smi || echo 'no nvidia-smi'); $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA device\")'; nproc; git log -1 --format='commit %H %s' 2>/dev/null || true"
# a from-scratch build: ~1 min on the GPU machine's 16 cores, 2.5-4 min on a 2-core CI machine
BUILD_LIMIT=150; [ "$DRY" = 1 ] && BUILD_LIMIT=420
phase build "$BUILD_LIMIT" env "${ARCH_ENV[@]}" $PY setup.py build_ext "${BUILD_OUT[@]}"
phase backends 30 $PY -c "import wavg_fused as wf; print(wf.backend_report())"
phase triton-warm 150 $PY -m wavg_fused.triton.warmup --device "$DEVICE"
phase tests 240 $PY -m pytest tests -m gpu -q -p no:cacheprovider -o addopts= -rs --junitxml="$LOGS/tests.xml"
phase bench-small 100 $PY -m wavg_fused.bench.cli bench --device "$DEVICE" --models "$SMALL" --variants "$VARIANTS_SMALL" \
  --repeats "$REPEATS" --json "$OUT/gpu-bench-small.json"
phase bench-large 120 $PY -m wavg_fused.bench.cli bench --device "$DEVICE" --models "$LARGE" --variants "$VARIANTS_LARGE" \
  --repeats "$REPEATS" --json "$OUT/gpu-bench-large.json"
phase groups 60 $PY benchmarks/groups.py --device "$DEVICE" --models $GROUP_MODELS --members $GROUP_MEMBERS \
  --repeats "$REPEATS" --json "$OUT/gpu-groups.json"
phase pytest-benchmark 90 env WAVG_BENCH_DEVICE="$DEVICE" WAVG_BENCH_MODELS="$BENCH_MODELS" \
  $PY -m pytest benchmarks -q -p no:cacheprovider -o addopts= --benchmark-only --benchmark-json="$OUT/pytest-benchmark.json"

echo "total $(($(date +%s) - START))s; $(ls "$OUT" | wc -l) files in $OUT:"
ls -la "$OUT"
if [ "$DRY" = 1 ]; then  # the script's own bugs: every phase must have run and succeeded on the CPU
  ! grep -v " 0 [0-9]*$" "$LOGS/phases.txt" || { echo "dry run: a phase failed or was skipped"; exit 1; }
  [ "$(ls "$OUT" | wc -l)" -le 8 ] || { echo "dry run: more than 8 files in $OUT"; exit 1; }
fi
exit 0
