"""Every script in examples/ runs at a tiny size (``--tiny``), in this process."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


def test_every_example_is_listed():
    assert {p.name for p in EXAMPLES} == {
        "train_loop.py",
        "gpt2_adamw.py",
        "autograd_adamw.py",
        "resnet_greg_export.py",
        "fsdp2_prune.py",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_tiny(path, monkeypatch, capsys):
    if path.stem == "gpt2_adamw":
        pytest.importorskip("transformers")
    monkeypatch.setattr(sys, "argv", [str(path), "--tiny"])
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert "total" in out  # every example ends with the pruner's summary table
