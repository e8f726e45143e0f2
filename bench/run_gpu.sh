#!/usr/bin/env bash
# One device call: install, run the GPU test suite and the benchmark report; results under $OUT (or bench/results).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
python -m pip install -q --no-deps -e . 2>&1 | tail -1 || true
python -m pip install -q --no-deps torch-pruning expecttest 2>/dev/null || true
python -m sparsetrain.cli info | tee "$OUT/info.txt"
TRITON_INTERPRET=0 python -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.txt" | tail -5
python bench/step_report.py --out "$OUT" 2>&1 | tee "$OUT/bench_log.txt"
