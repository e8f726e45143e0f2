#!/usr/bin/env bash
# One device call: versions and backends, the whole test suite on CUDA (compiled Triton kernels),
# then the benchmark report. Everything lands in $OUT (default bench/results). See bench/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 -m sparsetrain.cli info 2>&1 | tee "$OUT/info.txt"
python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15
python3 bench/step_report.py --out "$OUT" 2>&1 | tee "$OUT/bench_log.txt"
