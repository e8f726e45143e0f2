"""`sparsetrain bench`: the quick runs produce a row for every provider and mode, with finite
positive times, and the step builders they time do what they say. Speed is not asserted."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsetrain import backends
from sparsetrain.benchmarks import e2e, kernels, report, steps, timing
from sparsetrain.benchmarks.models import GPT2, ResNet50
from sparsetrain.benchmarks.shapes import gpt2_medium_shapes, resnet50_shapes
from sparsetrain.optional import MissingDependencyError

CPU = torch.device("cpu")
HEADER_KEYS = {"schema", "kind", "device_type", "device", "sparsetrain", "torch", "triton", "python", "date",
               "command", "complete"}  # fmt: skip
KERNEL_ROW_KEYS = {"model", "tensors", "elements", "algo", "dtype", "sparsity", "structure", "dead_fraction",
                   "bytes_per_element", "floor_ms", "provider"}  # fmt: skip


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def _command() -> list[str]:
    script = Path(sys.executable).parent / "sparsetrain"
    return [str(script)] if script.exists() else [sys.executable, "-c", "import sys, sparsetrain.cli as c; "
                                                                        "sys.exit(c.main())"]  # fmt: skip


@pytest.fixture(scope="module")
def kernel_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "--quick", "--device", "cpu", "--json", str(out / "k.json"), "--md", str(out / "k.md"),
            "--plot", str(out / "k.png")]  # fmt: skip
    done = subprocess.run(_command() + args, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "k.json").read_text()), done.stdout, out


def test_quick_kernel_run_has_a_finite_row_for_every_provider_and_case(kernel_run):
    result, stdout, out = kernel_run
    assert HEADER_KEYS <= result.keys() and result["kind"] == "kernels" and result["complete"]
    assert result["command"].startswith("sparsetrain bench --quick")
    assert _positive(result["copy_ceiling_GBps"])
    # every sparsetrain backend is either timed or reported with the reason it cannot run here
    for name in backends.BACKENDS:
        label = f"sparsetrain[{name}]"
        assert (label in result["providers"]) != (label in result["skipped_providers"]), label
    assert "sparsetrain[torch]" in result["providers"]
    assert {"torch.optim", "eager", "compiled"} <= result["providers"].keys()
    expected = list(kernels.cases("quick", "quick"))
    assert len(result["rows"]) == len(expected) * len(result["providers"])
    for row in result["rows"]:
        assert KERNEL_ROW_KEYS <= row.keys()
        assert row["provider"] in result["providers"]
        if "ms" in row:
            assert all(_positive(row[k]) for k in ("ms", "GBps", "of_ceiling", "floor_ms")), row
            assert all(_positive(v) for v in row["speedup"].values()), row
        else:
            assert row["provider"] == "compiled" and row["skipped"].startswith("compiled for"), row
    for provider in result["providers"]:
        timed = [r for r in result["rows"] if r["provider"] == provider and "ms" in r]
        assert timed, f"{provider} has no timed row"
    assert any("compile_s" in r and _positive(r["compile_s"]) for r in result["rows"])
    # sparse cases: the dead fraction is what was asked (structured keeps the 1-d tensors alive)
    sparse = {(r["structure"], r["sparsity"]): r["dead_fraction"] for r in result["rows"] if r["sparsity"]}
    assert sparse and all(abs(dead - s) < 0.02 for (_, s), dead in sparse.items())
    # the global threshold: three methods per model and fraction, all finding the same value
    methods = {r["method"] for r in result["select"]}
    assert methods == {"sparsetrain radix select", "torch.sort", "torch.kthvalue"}
    assert all(r["agrees"] and _positive(r["ms"]) and r["peak_bytes"] >= 0 for r in result["select"])
    text = (out / "k.md").read_text()
    assert text == stdout
    for provider in result["providers"]:
        assert f"| {provider} |" in text
    assert (out / "k.png").stat().st_size > 10_000


def test_quick_e2e_run_trains_every_mode(tmp_path):
    from sparsetrain import cli

    args = ["bench", "e2e", "--quick", "--device", "cpu", "--no-progress", "--json", str(tmp_path / "e.json"),
            "--plot", str(tmp_path / "e.png")]  # fmt: skip
    assert cli.main(args) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert HEADER_KEYS <= result.keys() and result["kind"] == "e2e" and result["complete"]
    models = {w.name for w in e2e.workloads("quick")}
    assert {(r["model"], r["mode"]) for r in result["rows"]} == {(m, mode) for m in models for mode in e2e.MODES}
    for row in result["rows"]:
        assert _positive(row["ms_per_step"]) and _positive(row["ratio_vs_dense"])
        assert len(row["ms_steps"]) == result["steps"] and len(row["losses"]) == result["steps"] + result["warmup"]
        assert all(math.isfinite(v) for v in row["losses"])
        if row["mode"] == "dense":
            assert row["ratio_vs_dense"] == 1.0 and row["prunable_sparsity"] == 0.0
        if row["mode"] in ("eager pruning", "sparsetrain StochasticMagnitude"):
            assert row["prunable_sparsity"] > 0.5, row  # the cubic schedule reaches 90% at the last step
    assert (tmp_path / "e.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------- the pieces
@pytest.mark.parametrize("algo", steps.ALGOS)
@pytest.mark.parametrize("build", [steps.torch_optim_step, steps.eager_pruning_step,
                                   lambda p, a, m: steps.sparsetrain_step(p, a, m, backend="torch")])  # fmt: skip
def test_every_step_builder_updates_and_keeps_masked_weights_at_zero(build, algo):
    params = steps.make([(12, 5, 3), (7,), (33, 17)], CPU)
    masks = steps.make_masks(params, 0.5, "unstructured")
    before = [p.detach().clone() for p in params]
    step = build(params, algo, masks)
    step()
    assert all(not torch.equal(a, b) for a, b in zip(params, before))
    if build is not steps.torch_optim_step:  # the no-pruning peer ignores masks by design
        for p, m in zip(params, masks):
            assert torch.count_nonzero(p[~m]) == 0


def test_compiled_adamw_step_matches_the_eager_update_without_pruning(monkeypatch):
    monkeypatch.setattr(steps, "PRUNE_FRACTION", 0.0)  # no sampling: the update alone
    params = steps.make([(9, 4), (6,)], CPU)
    twins = [p.detach().clone() for p in params]
    for t, p in zip(twins, params):
        t.grad = p.grad.clone()
    compiled = steps.compiled_pruning_step(params, "adamw")
    compiled()
    opt = torch.optim.AdamW(twins, lr=steps.LR, betas=steps.BETAS, eps=steps.EPS, weight_decay=steps.WEIGHT_DECAY)
    with torch.no_grad():
        for _ in range(2):  # the builder's compile call is the first step
            torch._foreach_add_([t.grad for t in twins], twins, alpha=steps.L2)
            opt.step()
            for t, p in zip(twins, params):
                t.grad = p.grad.clone()
    torch.testing.assert_close(params, twins)
    assert compiled.compile_s > 0


def test_structured_masks_kill_whole_rows_and_leave_vectors_alive():
    params = steps.make([(40, 6, 3), (40,)], CPU)
    weight, bias = steps.make_masks(params, 0.9, "structured")
    rows = weight.reshape(40, -1)
    assert torch.equal(rows.all(1), rows.any(1)) and int(rows.all(1).sum()) == 4
    assert bool(bias.all())


def test_bytes_per_element_of_the_formats():
    assert kernels.bytes_per_element("sgd", "fp32", 0.0) == 4 * 3 + 8 + 0.25
    assert kernels.bytes_per_element("adamw", "bf16", 0.0) == 2 * 3 + 2 * 2 * 2 + 0.25  # bf16 moments, as torch.optim
    assert kernels.bytes_per_element("sgd", "fp32", 1.0) == 1 / 8


def test_model_definitions_have_the_benchmark_shapes():
    resnet = ResNet50(classes=1000 // 16, scale=16)
    assert [tuple(p.shape) for p in resnet.parameters()] == resnet50_shapes(16)
    gpt = GPT2(vocab=50257 // 64, ctx=1024 // 64, d=1024 // 64, layers=24, heads=1)
    numels = sorted(p.numel() for p in gpt.parameters())
    assert numels == sorted(math.prod(s) for s in gpt2_medium_shapes(64))
    assert len(resnet50_shapes()) == 161 and len(gpt2_medium_shapes()) == 292


def test_cpu_peak_memory_counts_what_is_held_at_once():
    def hold_two():
        a = torch.empty(2**20)  # 4 MiB
        b = torch.empty(2**20)
        del a, b
        c = torch.empty(2**19)  # 2 MiB, after both are freed
        del c

    peak = timing.peak_extra_bytes(hold_two, CPU)
    assert 8 * 2**20 <= peak < 9 * 2**20


def test_cpu_timer_takes_the_median_after_warmup():
    calls = []
    budget = timing.Budget(warmup=2, min_reps=3, max_reps=3, seconds=0.0)
    ms = timing.time_ms(lambda: calls.append(1), CPU, budget)
    assert len(calls) == 5 and ms >= 0


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'sparsetrain\[methods\]'"):
        report.require_matplotlib()


def test_unknown_provider_is_refused_with_the_known_names():
    with pytest.raises(SystemExit, match="unknown provider.*torch.optim"):
        kernels.providers(CPU, ["nope"])


def test_readme_performance_tables_are_generated_from_the_committed_results():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "bench" / "readme_table.py"), "--check"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not backends.availability("native")[0], reason=backends.availability("native")[1])
def test_native_cpu_bench_runs_and_labels_what_each_case_computes(tmp_path, monkeypatch):
    """bench/native_cpu.py at a tiny size: every case runs on the native backend and the torch reference,
    and each case computes the statistics its label names (those StochasticMagnitude's steps compute)."""
    from sparsetrain import contract

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import native_cpu

    every = contract.STATS_ALIVE | contract.STATS_SUM_ABS_W | contract.STATS_SUM_KERNEL
    assert (native_cpu.BEFORE_EVENT, native_cpu.EVENT, native_cpu.EVENT_EVERY_STEP) == (
        contract.STATS_ALIVE | contract.STATS_SUM_KERNEL,
        contract.STATS_NONE,
        every,
    )
    out = tmp_path / "report.md"
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", ["native_cpu.py", "--elements", "3000", "--threads", "1", "--reps", "1",
                                      "--out", str(out)])  # fmt: skip
    try:
        native_cpu.main()
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    for backend in ("native", "torch reference"):
        for algo in ("SGD", "AdamW"):
            for *_, label in native_cpu.CASES:
                assert f"| {backend} {algo} {label} |" in text, (backend, algo, label)
    assert "sampling event on every step, computes alive, sum abs(w), kernel sum" in text


@pytest.mark.skipif(not backends.availability("native")[0], reason=backends.availability("native")[1])
def test_native_cpu_bench_repeated_step_before_an_event_computes_the_kernel_sum():
    """The bench's repeated "step before an event" (which computes alive and the kernel sum, not sum |w|)
    runs every repetition with the kernel scale a real run has: the kernel sum it writes matches the one
    computed from the weights it leaves, on the second and later steps as on the first."""
    from sparsetrain import contract, masks

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import native_cpu

    x = native_cpu._inputs(native_cpu._shapes(3000), "sgd")
    saved = x["stats"][0].clone()  # the previous step's statistics, which the bench gives every step
    for _ in range(3):
        native_cpu._fused(x, "native", "sgd", "none", True, native_cpu.BEFORE_EVENT)
        temperature = float(x["tensor_coefs"][0][contract.COEF_TEMPERATURE])
        tm = temperature * float(saved[contract.STAT_SUM_ABS_W] / saved[contract.STAT_ALIVE])
        alive = masks.unpack(x["mask_words"][0], x["params"][0].numel())
        w = x["params"][0].double().abs().view(-1)
        expected = (torch.exp(-w / tm) * alive).sum()
        torch.testing.assert_close(x["stats"][0][contract.STAT_SUM_KERNEL], expected, rtol=1e-5, atol=0.0)
