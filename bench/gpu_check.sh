#!/usr/bin/env bash
# The GPU check, run on a lent GPU machine (no internet): bash bench/gpu_check.sh OUTDIR [--quick]
# One call of at most 9 minutes (--quick: 3) that builds, measures the ceilings, runs the GPU contract suite
# and times every kernel; OUTDIR receives summary.csv, log.txt, results.tar.gz and summary.txt (printed
# last). bench/gpu_check.py says what each step does.
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR [--quick]}
shift
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m bench.gpu_check "$OUT" "$@"
