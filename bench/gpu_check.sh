#!/usr/bin/env bash
# GPU check, run on a lent GPU machine (no internet): bash bench/gpu_check.sh OUTDIR
# Builds the package with the machine's own python3 and the CUDA extension, runs the GPU tests and the
# GPU benchmark, and writes logs and CSVs into OUTDIR. Budget: a few minutes.
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
$PY -c "import torch, sys; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export METAUG_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
echo "== build" ; time $PY -m pip install -e . --no-build-isolation --no-deps > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
$PY -c "import metaug_fast; print('backends:', metaug_fast.available_backends())" | tee -a "$OUT/versions.txt"
echo "== GPU tests"
$PY -m pytest -q tests/test_cuda.py -p no:cacheprovider 2>&1 | tee "$OUT/test_cuda.log" | tail -5
echo "== GPU benchmark"
$PY -m bench.bench_oucl_score --device cuda --out "$OUT/oucl_score_gpu.csv" 2>&1 | tee "$OUT/bench_score.log"
echo "done: $OUT"
