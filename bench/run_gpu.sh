#!/usr/bin/env bash
# GPU work in three device calls (each must finish within the device's 10-minute limit):
#   bash bench/run_gpu.sh tests   # versions and backends, the whole test suite on CUDA (compiled kernels)
#   bash bench/run_gpu.sh bench   # the benchmark report against the baselines (step_report.py)
#   bash bench/run_gpu.sh kernels # `sparsetrain bench` at full sizes (every provider, case and the threshold)
#   bash bench/run_gpu.sh e2e     # `sparsetrain bench e2e`: GPT-2 small and ResNet-50 training steps
#   bash bench/run_gpu.sh sweep   # the fused step under each launch shape (words, warps, blocks)
#   bash bench/run_gpu.sh profile # Nsight Compute on the main kernel (268M SGD, AdamW, 90% dead), and
#                                 # compute-sanitizer memcheck on the Triton backend tests, memcheck and
#                                 # racecheck on the native CUDA driver's tests
#   bash bench/run_gpu.sh         # tests, bench, kernels, e2e and sweep
# Everything lands in $OUT (default bench/results); the report is rewritten after every row, so a
# cut-off run keeps what finished. See bench/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
STAGE="${1:-all}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# editable install: sparsetrain.kernels is the kernels/ folder, mapped by the package metadata.
# Without setuptools (nothing can be fetched there), lay the sources out as installed in this
# working copy (the device's copy; nothing of it comes back) and put it on PYTHONPATH.
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2> "$OUT/install.txt"; then
    echo "editable install failed (see install.txt); running from the source tree" >&2
    [[ -e sparsetrain/kernels ]] || cp -r kernels sparsetrain/kernels || exit 1
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import sparsetrain.kernels.fused_step" || exit 1
if [[ "$STAGE" == all || "$STAGE" == tests ]]; then
    python3 -m sparsetrain.cli info 2>&1 | tee "$OUT/info.txt"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv >> "$OUT/info.txt" 2>&1
    python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15
fi
if [[ "$STAGE" == all || "$STAGE" == bench ]]; then
    python3 bench/step_report.py --out "$OUT" 2>&1 | tee "$OUT/bench_log.txt"
fi
# charts only where matplotlib is installed (the tables and JSON never need it)
has_plot() { python3 -c "import matplotlib" 2> /dev/null; }
DAY="$(date -u +%F)"
if [[ "$STAGE" == all || "$STAGE" == kernels ]]; then
    # one model per invocation keeps each under the 10-minute budget of a device call
    for model in "one tensor" "ResNet-50" "GPT-2-medium"; do
        stem="$OUT/kernels_gpu_${model// /_}_$DAY"
        plot=(); has_plot && plot=(--plot "$stem.png")
        python3 -m sparsetrain.cli bench --no-progress --models "$model" --json "$stem.json" --md "$stem.md" \
            "${plot[@]}" 2>&1 | tee -a "$OUT/kernels_log.txt" | tail -5
    done
fi
if [[ "$STAGE" == all || "$STAGE" == e2e ]]; then
    stem="$OUT/e2e_gpu_$DAY"
    plot=(); has_plot && plot=(--plot "$stem.png")
    python3 -m sparsetrain.cli bench e2e --no-progress --json "$stem.json" --md "$stem.md" "${plot[@]}" 2>&1 \
        | tee "$OUT/e2e_log.txt"
fi
if [[ "$STAGE" == all || "$STAGE" == sweep ]]; then
    python3 bench/step_report.py --sweep-only --out "$OUT" 2>&1 | tee "$OUT/sweep_log.txt"
fi
if [[ "$STAGE" == profile ]]; then
    # one launch after warm-up (the first steps compile and build the plan); clocks left alone
    for case in sgd adamw dead90; do
        ncu --clock-control none --kernel-name regex:fused_step --launch-skip 3 --launch-count 1 \
            --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
            --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
            python3 bench/profile_step.py --case "$case" --steps 5 > "$OUT/ncu_$case.txt" 2>&1
        tail -40 "$OUT/ncu_$case.txt"
    done
    compute-sanitizer --tool memcheck --target-processes all \
        python3 -m pytest -q -p no:cacheprovider -x tests/test_triton_backend.py 2>&1 | tail -40 \
        | tee "$OUT/memcheck.txt"
    # the native CUDA driver (built at install when torch is a CUDA build and nvcc is found): memory
    # errors and shared-memory races of its kernel on the backend-agreement tests
    if python3 -c "from sparsetrain import backends; import sys, torch; sys.exit(not backends.runs_on('native', torch.device('cuda'))[0])"; then
        for tool in memcheck racecheck; do
            compute-sanitizer --tool "$tool" --target-processes all \
                python3 -m pytest -q -p no:cacheprovider -x tests/test_native_backend.py 2>&1 | tail -40 \
                | tee "$OUT/native_$tool.txt"
        done
    else
        echo "native CUDA driver not built: see sparsetrain info" | tee "$OUT/native_memcheck.txt"
    fi
fi
