"""The CUDA driver compiles for sm_80 and sm_90a on a CPU-only machine, without register spills.

scripts/cuda_compile_check.py compiles csrc/cuda_driver.cu with setup.py's nvcc flags against the
headers of a CUDA build of torch (fetched into build/ inside the checkout) and reports registers and
spills per kernel instantiation; the report is printed (pytest -s, or -rA) and checked here.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cuda_compile_check.py"
sys.path.insert(0, str(SCRIPT.parent))
from cuda_compile_check import find_nvcc  # noqa: E402


@pytest.mark.skipif(find_nvcc() is None, reason="no CUDA toolkit (nvcc) on this machine: set CUDA_HOME")
def test_cuda_driver_compiles_for_sm80_and_sm90a_without_spills():
    result = subprocess.run([sys.executable, str(SCRIPT), "--json"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    for report in reports:
        print(report)
    # fp32 / bf16 / fp16 parameters, SGD and Adam, for each architecture
    assert {(r["arch"], r["kernel"]) for r in reports} == {
        (f"sm_{arch}", f"fused_step_kernel<{dtype}, {adam}>")
        for arch in ("80", "90a")
        for dtype in ("float", "c10::BFloat16", "c10::Half")
        for adam in ("false", "true")
    }
    for report in reports:
        assert report["spill_stores"] == 0 and report["spill_loads"] == 0, report
        assert report["registers"] <= 255, report
