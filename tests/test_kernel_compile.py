"""The Triton kernels compile for an H100 (sm_90) through Triton's GPU compiler and ptxas, on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@pytest.mark.skipif(not CUOBJDUMP.exists(), reason="this Triton wheel ships no CUDA tools")
def test_kernels_lower_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("aot_compile.py")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    named = {report["variant"]: report for report in reports}
    assert len(named) == len(reports) and sum(name.startswith("switch:") for name in named) == 29
    for report in reports:
        assert report["spill_bytes"] == 0, report
        assert report["registers"] <= 255, report
    # full blocks of 16-byte aligned tensors stream through vector accesses (16 bytes, or 8 for 16-bit
    # parameters at 4 elements per thread): at least one load per tensor read (w, g, states) and one
    # store per tensor written; unaligned tensors use none. Every switch combination must lower.
    streamed = {"sgd": (3, 2), "adamw": (5, 4)}  # (reads, writes) with momentum / amsgrad on
    for report in reports[:9]:
        assert not report["variant"].startswith("switch:")
        if report["variant"].endswith("unaligned"):
            assert report["vector_loads"] == report["vector_stores"] == 0, report
        else:
            reads, writes = streamed[report["variant"].split()[0]]
            assert report["vector_loads"] >= reads and report["vector_stores"] >= writes, report
    forward, backward = named["masked weight forward bf16"], named["masked weight backward fp32"]
    assert forward["vector_loads"] >= 1 and forward["vector_stores"] >= 1, forward
    assert backward["vector_loads"] >= 2 and backward["vector_stores"] >= 1, backward


# Issue time / memory floor of the fused step's cases, from the sm_90 SASS (method: tests/issue_time.py).
# Cases still above their target fail strictly as expected failures, so meeting a target is noticed.
NOT_MET = {"adamw fp32 non-event, statistics kept", "sgd bf16 event, bf16 states", "adamw bf16 event, bf16 states"}


@pytest.fixture(scope="module")
def issue_report():
    if not CUOBJDUMP.exists():
        pytest.skip("this Triton wheel ships no CUDA tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("issue_time.py")
    result = subprocess.run(
        [sys.executable, str(script), "--markdown"], capture_output=True, text=True, env=env, timeout=1800
    )
    assert result.returncode == 0, result.stderr[-4000:]
    print(result.stdout[result.stdout.index("\n|") :])  # the table, shown with -s and in CI logs on failure
    return {row["case"]: row for row in map(json.loads, (s for s in result.stdout.splitlines() if s.startswith("{")))}


def _cases():
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        import issue_time
    except ImportError:  # no Triton: the fixture skips
        return []
    return [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason="above its target")) if name in NOT_MET else name
        for name, *_ in issue_time.CASES
    ]


@pytest.mark.parametrize("case", _cases())
def test_issue_time_within_target_of_the_memory_floor(issue_report, case):
    row = issue_report[case]
    print(json.dumps({k: v for k, v in row.items() if k != "opcodes"}))
    assert row["issue_over_floor"] <= row["target"], row
