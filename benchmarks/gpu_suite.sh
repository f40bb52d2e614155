#!/usr/bin/env bash
# One command for a lent GPU machine (/work/.library/device/METHOD.md): build the extension, run the
# whole test suite on CUDA, then the benchmarks on the GPU (all zoo models incl. the 1.3B LLaMA, fp32
# and bf16-model/fp32-average, L2 overwritten before every sample) and the quick CPU run.
# Everything lands under $OUT; commit it under benchmarks/results/ with the device named.
#   run: bash benchmarks/gpu_suite.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu-run}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

{ nvidia-smi; $PY -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"; } \
  > "$OUT/device.txt" 2>&1
WAVG_FUSED_BUILD_CUDA=1 WAVG_FUSED_PTXAS_VERBOSE=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  MAX_JOBS=16 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
grep -E "registers|spill" "$OUT/build.log" | sort | uniq -c
$PY -c "import wavg_fused as wf; print(wf.backend_report())" | tee "$OUT/backends.txt"

WAVG_FUSED_EXPECT_EXT=1 timeout 540 $PY -m pytest -q -p no:cacheprovider -rs --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
echo "tests exit status $?"; tail -8 "$OUT/tests.log"

$PY -m wavg_fused.bench.cli bench --device cuda --json "$OUT/gpu-bench.json" 2>&1 | tee "$OUT/gpu-bench.txt"
WAVG_BENCH_DEVICE=cuda WAVG_BENCH_MODELS=2000x1k,resnet50,vit_b16,gpt2 $PY -m pytest benchmarks -q -p no:cacheprovider \
  --benchmark-only --benchmark-json="$OUT/pytest-benchmark-gpu.json" > "$OUT/pytest-benchmark-gpu.txt" 2>&1
echo "pytest-benchmark exit status $?"
$PY -m wavg_fused.bench.cli bench --quick --json "$OUT/cpu-bench.json" > "$OUT/cpu-bench.txt" 2>&1
