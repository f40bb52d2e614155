#!/usr/bin/env bash
# One command for a lent GPU machine (/work/.library/device/METHOD.md): build the extension, run the
# whole test suite on CUDA, benchmark on the GPU and the CPU. Everything lands under $OUT; commit it
# under benchmarks/results/ with the device named.
#   run: bash benchmarks/gpu_suite.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu-run}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

{ nvidia-smi; $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } \
  > "$OUT/device.txt" 2>&1
WAVG_FUSED_BUILD_CUDA=1 WAVG_FUSED_PTXAS_VERBOSE=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  MAX_JOBS=16 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
grep -E "registers|spill" "$OUT/build.log" | sort | uniq -c
$PY -c "import wavg_fused as wf; print(wf.backend_report())" | tee "$OUT/backends.txt"

$PY -m pytest -q -p no:cacheprovider -rs --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
echo "tests exit status $?"; tail -8 "$OUT/tests.log"

$PY -m wavg_fused.bench.cli bench --device cuda --json "$OUT/gpu-bench.json" 2>&1 | tee "$OUT/gpu-bench.txt"
$PY -m wavg_fused.bench.cli bench --quick --json "$OUT/cpu-bench.json" > "$OUT/cpu-bench.txt" 2>&1
