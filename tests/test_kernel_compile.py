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
    assert len(named) == len(reports) and sum(name.startswith("switch:") for name in named) == 31
    for report in reports:
        assert report["spill_bytes"] == 0, report
        assert report["registers"] <= 255, report
    # full blocks of 16-byte aligned tensors stream through vector accesses (16 bytes, or 8 for 16-bit
    # parameters at 4 elements per thread): at least one load per tensor read (w, g, states) and one
    # store per tensor written; unaligned tensors use none. Every switch combination must lower.
    streamed = {"sgd": (3, 2), "adamw": (5, 4)}  # (reads, writes) with momentum / amsgrad on
    for report in reports[:10]:
        assert not report["variant"].startswith("switch:")
        if report["variant"].endswith("unaligned"):
            assert report["vector_loads"] == report["vector_stores"] == 0, report
        else:
            reads, writes = streamed[report["variant"].split()[0]]
            assert report["vector_loads"] >= reads and report["vector_stores"] >= writes, report
    # a sum no step reads costs nothing: SGD computing no statistic has no fp64 add (neither a sum nor a
    # per-block add of zeros), while with every statistic on it has them
    assert named["switch: sgd STATS_OUT=False"]["fp64_adds"] == 0, named["switch: sgd STATS_OUT=False"]
    assert named["sgd fp32 stochastic"]["fp64_adds"] > 0, named["sgd fp32 stochastic"]
    forward, backward = named["masked weight forward bf16"], named["masked weight backward fp32"]
    assert forward["vector_loads"] >= 1 and forward["vector_stores"] >= 1, forward
    assert backward["vector_loads"] >= 2 and backward["vector_stores"] >= 1, backward


# Issue time / memory floor of the fused step's cases, from the sm_90 SASS (method: tests/issue_time.py).
# Cases still above their target fail strictly as expected failures, so meeting a target is noticed.
NOT_MET = {
    "sgd bf16 event, bf16 states",
    "adamw bf16 event, bf16 states",
    "sgd bf16 event, bf16 states, all statistics written",
    "adamw bf16 event, bf16 states, all statistics written",
}


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


# Every data load of a block in flight before the first use of a loaded value (one memory round trip per
# block), read from the same SASS.
def _load_cases():
    return [case if isinstance(case, str) else case.values[0] for case in _cases()]


@pytest.mark.parametrize("case", _load_cases())
def test_every_block_load_issues_before_the_first_use_of_a_loaded_value(issue_report, case):
    assert issue_report[case]["loads_after_first_use"] == [], issue_report[case]["loads_after_first_use"]


def test_load_order_check_finds_a_load_after_a_use():
    sys.path.insert(0, str(Path(__file__).parent))
    issue_time = pytest.importorskip("issue_time")
    block = ["LDG.E R9, desc[UR8][R2.64]", "LDG.E.128 R40, desc[UR8][R52.64]", "IMAD.SHL.U32 R5, R6, 0x4, RZ"]
    ok = [*block, "LDG.E.64 R44, desc[UR8][R54.64]", "FADD R7, R41, R45", "STG.E.128 desc[UR8][R52.64], R40"]
    late = [*block, "FSEL R7, R42, RZ, P0", "LDG.E.128 R44, desc[UR8][R54.64]", "STG.E.128 desc[UR8][R52.64], R40"]
    next_block = [*ok, "LDG.E.128 R40, desc[UR8][R56.64]", "FADD R7, R41, R1", "LDG.E.128 R44, desc[UR8][R58.64]"]
    assert issue_time.loads_after_first_use(ok) == []
    assert issue_time.loads_after_first_use(late) == ["LDG.E.128 R44, desc[UR8][R54.64]"]
    assert issue_time.loads_after_first_use(next_block) == ["LDG.E.128 R44, desc[UR8][R58.64]"]
    # a predicate test reads its first register; a store reads all of them
    assert issue_time.loads_after_first_use([*block, "LOP3.LUT P3, RZ, R43, R1, RZ, 0xc0, !PT", *block[1:2]])
