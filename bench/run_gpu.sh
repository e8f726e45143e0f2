#!/usr/bin/env bash
# One device call: versions and backends, the whole test suite on CUDA (compiled Triton kernels),
# then the benchmark report. Everything lands in $OUT (default bench/results). See bench/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# editable install: sparsetrain.kernels is the kernels/ folder, mapped by the package metadata
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
python3 -m sparsetrain.cli info 2>&1 | tee "$OUT/info.txt"
python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15
python3 bench/step_report.py --sweep --out "$OUT" 2>&1 | tee "$OUT/bench_log.txt"
