"""The GPU benchmark script's fused step runs (tiny sizes; CPU in CI): a device call must not be lost to a typo.

Times are not taken here; only that the sparsetrain step executes and that the report renders
(the peers it is compared with are tested in test_benchmarks.py). Under TRITON_INTERPRET=1 the
sparsetrain step runs the interpreted Triton kernels.
"""

import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, triton_usable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import step_report  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_usable()[0], reason=triton_usable()[1])
SHAPES = [(8, 3, 3, 3), (8,), (40, 33)]


@pytest.mark.parametrize("algo", ["sgd", "adamw"])
def test_the_fused_step_runs(algo):
    params = step_report.make(SHAPES, DEVICE)
    before = [p.detach().clone() for p in params]
    step_report.ours(params, algo)()
    assert all(not torch.equal(a, b) for a, b in zip(params, before))


def test_structured_case_keeps_dead_filters_at_zero():
    params = step_report.make([(20, 7)], DEVICE)
    step = step_report.ours(params, "sgd", dead_filter_fraction=0.9)
    step()
    live_rows = torch.count_nonzero(params[0], dim=1) > 0
    assert int(live_rows.sum()) == 2


def test_unstructured_case_prunes_the_asked_fraction():
    params = step_report.make([(64, 1000)], DEVICE)
    step_report.ours(params, "sgd", dead_fraction=0.95)()
    assert 0.94 < 1 - torch.count_nonzero(params[0]).item() / params[0].numel() < 0.96


def test_report_renders():
    rows = [
        {"scenario": "s", "elements": 10, "torch_fused_no_pruning_ms": 2.0, "sparsetrain_ms": 1.0, "floor_ms": 0.9,
         "fraction_of_copy_ceiling": 0.9},
        {"scenario": "f", "elements": 10, "sparsetrain_dense_ms": 1.0, "sparsetrain_90pct_dead_ms": 0.2, "ratio": 0.2},
    ]  # fmt: skip
    sweep = [{"case": "c", "words": 32, "num_warps": 4, "blocks": 8, "ms": 1.0, "of_ceiling": 0.9}]
    report = {"device": "d", "torch": "t", "triton": "x", "date": "2026", "command": "c", "copy_ceiling_TBps": 3.0,
              "launch_shape": {"words": 32, "num_warps": 4, "blocks": 8}, "rows": rows, "sweep": sweep}  # fmt: skip
    text = step_report.markdown(report)
    assert "| s | 2.000 ms |" in text and "0.20x" in text and "| 32 | 4 | 8 | 1.000 (90%) |" in text
    assert "- fastest for c: 32 words, 4 warps, 8 blocks per program: 1.000 ms (90%)" in text


def test_incomplete_report_renders():
    report = {"device": "d", "torch": "t", "triton": "x", "date": "2026", "command": "c", "complete": False,
              "launch_shape": {"words": 32, "num_warps": 4, "blocks": 8}, "rows": [], "sweep": []}  # fmt: skip
    assert "Incomplete run" in step_report.markdown(report)
