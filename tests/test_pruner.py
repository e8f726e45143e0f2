"""Pruner API, bad input, resumption, metrics, export and the autograd path."""

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import sparsetrain
from sparsetrain import methods
from sparsetrain.autograd import MaskedPruner, masked_weight
from sparsetrain.contract import COEF_L1, COEF_L2


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 8 * 8, 4),
    )


def _steps(model, opt, n, seed=0, after=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(4, 1, 8, 8, generator=gen)
        y = torch.randint(0, 4, (4,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if after is not None:
            after()
        opt.zero_grad()


def test_default_targets_are_conv_and_linear_weights():
    model = _cnn()
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1)
    pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.5))
    assert [t.name for t in pruner.targets] == ["0.weight", "3.weight", "6.weight"]
    model = _cnn()
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1)
    pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.5), exclude=["6"], ratios={"3": 0.25})
    assert [t.name for t in pruner.targets] == ["0.weight", "3.weight"]
    assert float((~pruner.mask("3")).float().mean()) == pytest.approx(0.25, abs=1 / 432)
    assert float((~pruner.mask("0.weight")).float().mean()) == pytest.approx(0.5, abs=1 / 72)


@pytest.mark.parametrize(
    "kwargs,method,error,match",
    [
        (
            dict(include=["conv9"]),
            methods.Magnitude(0.5),
            ValueError,
            "include: no module of the model matches 'conv9'",
        ),
        (dict(exclude=["nope"]), methods.Magnitude(0.5), ValueError, "exclude: no module"),
        (dict(ratios={"3": 1.0}), methods.Magnitude(0.5), ValueError, r"ratios\['3'\] must be in \[0, 1\)"),
        (
            dict(include=["1"], coupled=False),
            methods.GReg1(0.5),
            ValueError,
            "module '1' .*needs a weight with at least 2 dims",
        ),
    ],
)
def test_bad_configuration_fails_before_training(kwargs, method, error, match):
    model = _cnn()
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        sparsetrain.Pruner(model, opt, method, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_ratio_and_exceeded_target_and_foreign_optimizer():
    with pytest.raises(ValueError, match=r"target must be in \[0, 1\)"):
        methods.StochasticMagnitude(1.2)
    with pytest.raises(ValueError, match=r"target must be in \[0, 1\)"):
        methods.GReg1(-0.1)
    model = _cnn()
    with torch.no_grad():
        model[0].weight[:6] = 0  # 75% zeros already
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="0.weight is already 75.0% sparse, above its target 50.0%; its zeros stay"):
        sparsetrain.Pruner(model, opt, methods.StochasticMagnitude(0.5))
    with pytest.raises(TypeError, match="needs a sparsetrain optimizer .* sparsetrain.autograd.MaskedPruner"):
        sparsetrain.Pruner(_cnn(), torch.optim.SGD(_cnn().parameters(), lr=0.1), methods.Magnitude(0.5))


def test_resume_pruner_and_optimizer_bit_identical():
    def build(model):
        opt = sparsetrain.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, backend="torch", seed=11)
        method = methods.StochasticMagnitude(0.7, start=2, end=30, interval=2, temperature=0.5, l2=1e-3)
        return opt, sparsetrain.Pruner(model, opt, method, record_every=3)

    straight = _cnn(1)
    opt, pruner = build(straight)
    _steps(straight, opt, 40)

    first = _cnn(1)
    opt1, pruner1 = build(first)
    _steps(first, opt1, 17)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "pruner": pruner1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed = _cnn(2)
    resumed.load_state_dict(saved["model"])
    opt2, pruner2 = build(resumed)
    opt2.load_state_dict(saved["opt"])
    pruner2.load_state_dict(saved["pruner"])
    gen_state = 17  # continue the data stream where it stopped
    gen = torch.Generator().manual_seed(0)
    for _ in range(gen_state):
        torch.randn(4, 1, 8, 8, generator=gen)
        torch.randint(0, 4, (4,), generator=gen)
    for _ in range(23):
        x = torch.randn(4, 1, 8, 8, generator=gen)
        y = torch.randint(0, 4, (4,), generator=gen)
        nn.functional.cross_entropy(resumed(x), y).backward()
        opt2.step()
        opt2.zero_grad()
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    for t1, t2 in zip(pruner.targets, pruner2.targets):
        assert torch.equal(pruner.mask(t1.param), pruner2.mask(t2.param))
    assert pruner.history.as_dict() == pruner2.history.as_dict()


def test_metrics_and_history():
    model = _cnn()
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1)
    method = methods.Magnitude(0.5, structure="filters")
    pruner = sparsetrain.Pruner(model, opt, method, record_every=2, example_inputs=torch.randn(2, 1, 8, 8))
    _steps(model, opt, 4)
    metrics = pruner.metrics()
    assert metrics["0.weight"]["dead_outputs"] == pytest.approx(0.5)
    assert metrics["0.weight"]["weight_sparsity"] == pytest.approx(0.5)
    assert metrics["1.bias"]["weight_sparsity"] == pytest.approx(0.5)  # BatchNorm shift goes with its filter
    assert metrics["3.weight"]["dead_inputs"] == pytest.approx(0.5)  # coupled: 3's inputs are 0's filters
    assert metrics["6.weight"]["dead_inputs"] == pytest.approx(0.5)  # the classifier's inputs, not its outputs
    assert metrics["6.weight"]["dead_outputs"] == 0.0
    history = pruner.history.as_dict()
    assert history["step"] == [2, 4]
    assert history["layers"]["3.weight"]["dead_outputs"] == [0.5, 0.5]


def test_structured_export_is_smaller_and_equal():
    from sparsetrain.export import size_report

    model = _cnn(3)
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(6, 1, 8, 8)
    method = methods.Magnitude(0.5, structure="filters")
    pruner = sparsetrain.Pruner(model, opt, method, include=["3"], example_inputs=x)
    _steps(model, opt, 5)
    model.eval()
    small = pruner.export(x)
    assert small[3].out_channels == 3 and small[6].in_features == 3 * 64
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)
    before, after = size_report(model, x), size_report(small, x)
    assert after["params"] < before["params"] and after["macs"] < before["macs"]


def test_export_refuses_to_change_the_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Sigmoid(), nn.Linear(8, 3))
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1)
    method = methods.Magnitude(0.5, structure="filters")
    pruner = sparsetrain.Pruner(model, opt, method, include=["0"], coupled=False)  # sigmoid(0) = 0.5 still feeds 2
    with pytest.raises(RuntimeError, match="would change the model's outputs"):
        pruner.export(torch.randn(4, 6))
    assert pruner.export(torch.randn(4, 6), structured=False)[0].weight.shape == (8, 6)
    # coupled (the default): the consumer's input slices are masked too, so the smaller model is exact
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Sigmoid(), nn.Linear(8, 3))
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 6)
    pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.5, structure="filters"), example_inputs=x)
    small = pruner.export(x)
    assert small[0].weight.shape == (4, 6) and small[2].weight.shape == (3, 4)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)


def test_masked_weight_op_and_gradient():
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    alive = torch.rand(5, 7) < 0.6
    words = sparsetrain.masks.pack(alive)
    coefs = torch.zeros(8)
    coefs[COEF_L2], coefs[COEF_L1] = 0.3, 0.05
    out = masked_weight(w, words, coefs)
    torch.testing.assert_close(out, w * alive)
    upstream = torch.randn(5, 7, dtype=torch.float64)
    out.backward(upstream)
    expected = (upstream + 0.3 * w.detach() + 0.05 * torch.sign(w.detach())) * alive
    torch.testing.assert_close(w.grad, expected)
    torch.library.opcheck(masked_weight, (torch.randn(5, 7, requires_grad=True), words, coefs))


def test_autograd_path_with_torch_adamw():
    model = _cnn(4)
    pruner = MaskedPruner(model, methods.Magnitude(0.6, schedule="linear", start=0, end=12, interval=4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _steps(model, opt, 16, after=pruner.step)
    for t in pruner.targets:
        alive = pruner.mask(t.param)
        assert float((~alive).float().mean()) == pytest.approx(0.6, abs=0.05)
        module = t.module
        torch.testing.assert_close(module.weight, module.parametrizations.weight.original * alive)
    small = pruner.export()
    assert not hasattr(small[0], "parametrizations")
    x = torch.randn(2, 1, 8, 8)
    model.eval()
    small.eval()
    torch.testing.assert_close(small(x), model(x))


def test_demo_smoke(tmp_path):
    from sparsetrain.demo import run_demo

    assert run_demo(out=str(tmp_path), backend="torch", epochs=1) == 0
    for name in (
        "results.md",
        "results.json",
        "node_dynamics_l1_vs_l2.png",
        "greg1_lam_and_ratio.png",
        "sparsity_per_layer_mlp_l2.png",
        "sparsity_per_layer_cnn_greg1.png",
    ):
        assert (tmp_path / name).stat().st_size > 0


def test_autograd_path_stochastic_reaches_target():
    model = _cnn(5)
    method = methods.StochasticMagnitude(0.7, start=2, end=20, interval=3, temperature=0.5, l2=1e-3)
    pruner = MaskedPruner(model, method, seed=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _steps(model, opt, 24, after=pruner.step)
    for t in pruner.targets:  # small layers (72 to 1536 weights): the last events' binomial spread is a few weights
        assert float((~pruner.mask(t.param)).float().mean()) == pytest.approx(0.7, abs=0.03), t.name
    assert pruner._mask_optimizer.prune_events == 7  # events at steps 2, 5, ..., 20
    coefs = pruner.optimizer.state[pruner.targets[0].param]["coefs"]
    assert float(coefs[COEF_L2]) == pytest.approx(1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("numel", [1, 33, 1023, 2049])
def test_masked_weight_triton_kernels_match_torch(numel, dtype):
    from conftest import DEVICE, triton_usable

    from sparsetrain.autograd import masked_weight_grad, masked_weight_grad_triton, masked_weight_triton

    if not triton_usable()[0]:
        pytest.skip(triton_usable()[1])
    gen = torch.Generator().manual_seed(numel)
    weight = torch.randn(numel, generator=gen).to(dtype).to(DEVICE)
    grad = torch.randn(numel, generator=gen).to(dtype).to(DEVICE)
    alive = torch.rand(numel, generator=gen) < 0.7
    words = sparsetrain.masks.pack(alive).to(DEVICE)
    coefs = torch.zeros(8)
    coefs[COEF_L2], coefs[COEF_L1] = 0.01, 0.002
    coefs = coefs.to(DEVICE)
    torch.testing.assert_close(masked_weight_triton(weight, words, coefs), weight * alive.to(DEVICE), rtol=0, atol=0)
    expected = masked_weight_grad(grad.float(), weight.float(), words, coefs).to(dtype)
    tol = 0 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(masked_weight_grad_triton(grad, weight, words, coefs), expected, rtol=tol, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_summary_and_metrics_count_batchnorm_entries_by_their_masks(masked):
    # BatchNorm's shift starts at 0 and its alive entries may stay 0: a row of a 1-D member counts the
    # masked (dead-channel) entries, not the zero values
    from architectures import ResNet18

    from sparsetrain.summary import layer_rows

    torch.manual_seed(0)
    model = ResNet18()
    probe = torch.randn(2, 3, 16, 16)
    method = methods.Magnitude(0.5, structure="filters")
    if masked:
        pruner = MaskedPruner(model, method, example_inputs=probe)
    else:
        pruner = sparsetrain.Pruner(model, sparsetrain.optim.SGD(model.parameters(), lr=0.1), method,
                                    example_inputs=probe)  # fmt: skip
    rows = {r.name: r for r in layer_rows(pruner)}
    metrics = pruner.metrics()
    vectors = [t for t in pruner.targets if t.param.dim() == 1]
    assert any(t.name.endswith("bn1.bias") for t in vectors)
    for t in vectors:
        dead = int((~pruner.mask(t.param)).sum())
        assert dead == t.param.numel() // 2, t.name  # every channel group loses half its channels
        row = rows[t.name]
        assert (row.dead_outputs, row.outputs, row.alive_params, row.params) == (dead, t.param.numel(), dead, 2 * dead)
        assert row.sparsity == 0.5, t.name
        assert metrics[t.name]["weight_sparsity"] == 0.5, t.name
        assert metrics[t.name]["dead_outputs"] == 0.5, t.name
    text = pruner.summary()
    assert "100.0%" not in text


def test_stochastic_prune_counts_are_the_per_tensor_formula_after_state_is_replaced():
    """The batched calibration (cached views) writes alive - (numel - level * ratio * numel), clamped at
    0, into every tensor's prune count, also after the optimizer's state tensors are replaced."""
    from sparsetrain.contract import COEF_PRUNE_COUNT, STAT_ALIVE

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.Linear(40, 33), nn.Linear(33, 3))
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.05, backend="torch")
    method = sparsetrain.methods.StochasticMagnitude(0.7, start=1, end=10, interval=1)
    pruner = sparsetrain.Pruner(model, opt, method)
    for step in (3, 7, 7):
        if step == 7:  # the second time: fresh statistics and coefficient tensors (as a checkpoint load makes)
            for t in pruner.targets:
                opt.state[t.param]["stats"] = pruner.stats(t).clone()
                opt.state[t.param]["coefs"] = pruner.coefs(t).clone()
        for t in pruner.targets:
            pruner.stats(t)[STAT_ALIVE] = float(torch.randint(1, t.param.numel() + 1, ()))
        method.before_step(pruner, step)
        level = method.level(step)
        for t in pruner.targets:
            n = t.param.numel()
            expected = (pruner.stats(t)[STAT_ALIVE] - (n - level * t.ratio * n)).clamp(min=0).float()
            torch.testing.assert_close(pruner.coefs(t)[COEF_PRUNE_COUNT], expected, rtol=0, atol=0)


@pytest.mark.parametrize("write", ["copy_", "data"])
def test_writes_into_pruned_weights_are_zeroed(write):
    # a write through the parameter is zeroed by the next step; one through .data (invisible to the
    # version counter) stays until rezero_pruned, after which the masks hold again
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    dense = model[0].weight.detach().clone()
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, backend="torch")
    pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.5))
    weight, dead = model[0].weight, ~pruner.mask("0.weight")

    def steps(n):
        for _ in range(n):
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()

    steps(2)
    if write == "copy_":
        with torch.no_grad():
            weight.copy_(dense)
    else:
        weight.data.copy_(dense)
    steps(1)
    if write == "data":
        assert torch.equal(weight[dead], dense[dead])  # the documented limit: not detected
        sparsetrain.optim.rezero_pruned(opt)
        steps(1)
    assert torch.equal(weight[dead], torch.zeros_like(weight[dead]))
    assert torch.equal(~pruner.mask("0.weight"), dead)


@pytest.mark.parametrize("path", ["fused", "autograd"])
def test_a_compiled_model_is_pruned_under_its_own_module_names(path):
    """``model = torch.compile(model)`` before the Pruner: patterns and names are the user's (``2``, not
    ``_orig_mod.2``), as for a DDP wrapper, and the export is a plain copy of the original module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    compiled = torch.compile(model)  # lazy: nothing is compiled before the first call
    method = methods.Magnitude(0.5)
    if path == "fused":
        pruner = sparsetrain.Pruner(
            compiled, sparsetrain.optim.SGD(compiled.parameters(), lr=0.1), method, exclude=["2"]
        )
    else:
        pruner = MaskedPruner(compiled, method, exclude=["2"])
    assert [t.name for t in pruner.targets] == ["0.weight"]
    assert list(pruner.metrics()) == ["0.weight"]
    small = pruner.export()
    assert type(small) is nn.Sequential
    torch.testing.assert_close(small[0].weight, model[0].weight.detach() * pruner.mask("0.weight"), rtol=0, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: methods.GReg1(0.5, delta=0.1, update_interval=1, stabilize=1),
        lambda: methods.GReg2(0.5, delta=0.1, delta_all=0.01, warm_ceiling=0.02, update_interval=1, stabilize=1),
    ],
    ids=["GReg1", "GReg2"],
)
@pytest.mark.parametrize("path", ["fused", "autograd"])
def test_a_method_object_attached_again_after_remove_starts_a_fresh_schedule(make, path):
    """Attached again after remove(), a GReg object stayed in its old phase ("pruned") with its old picks
    and penalties: the new model was never pruned. It now prunes exactly as a new object does."""
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def run(method):
        model = _cnn()
        if path == "fused":
            opt = sparsetrain.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, backend="torch")
            pruner = sparsetrain.Pruner(model, opt, method, example_inputs=x)
            _steps(model, opt, 16)
        else:
            pruner = MaskedPruner(model, method, example_inputs=x, backend="torch")
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            _steps(model, opt, 16, after=pruner.step)
        return pruner

    used = make()
    first = run(used)
    assert used.phase == "pruned"
    first.remove()
    again, fresh = run(used), run(make())
    assert not again.mask("0.weight").all()
    for target in fresh.targets:
        assert torch.equal(again.mask(target.name), fresh.mask(target.name)), target.name
    again_state, fresh_state = again.schedule_state_dict()["method"], fresh.schedule_state_dict()["method"]
    assert again_state.pop("phase") == fresh_state.pop("phase") == "pruned"
    torch.testing.assert_close(again_state, fresh_state, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["fused", "autograd"])
def test_export_keeps_the_models_own_parametrizations(path):
    """A model with a weight_norm-parametrized layer (wav2vec2's positional convolution) could not be exported:
    export read ``.original`` of every parametrization, and weight_norm keeps ``original0`` / ``original1``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    nn.utils.parametrizations.weight_norm(model[2])
    method = methods.Magnitude(0.5)
    if path == "fused":
        pruner = sparsetrain.Pruner(model, sparsetrain.optim.SGD(model.parameters(), lr=0.1), method)
    else:
        pruner = MaskedPruner(model, method)
    assert [t.name for t in pruner.targets] == ["0.weight", "4.weight"]  # weight_norm's weight is no Parameter
    small = pruner.export()
    assert nn.utils.parametrize.is_parametrized(small[2], "weight") and not nn.utils.parametrize.is_parametrized(
        small[0]
    )
    assert nn.utils.parametrize.is_parametrized(model[2], "weight")  # the original model is untouched
    assert (path == "autograd") == nn.utils.parametrize.is_parametrized(model[0], "weight")
    torch.testing.assert_close(small[0].weight, model[0].weight.detach() * pruner.mask("0.weight"), rtol=0, atol=0)
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=0)


class _Tied(nn.Module):
    """Two linear layers sharing one weight (``b.weight = a.weight``) and a third of its own."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 5)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_a_tied_weight_is_one_target_with_one_mask_counted_once():
    from torch.nn.utils import prune

    from sparsetrain.summary import layer_rows

    model = _Tied()
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.0, backend="torch")
    pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.5, scope="global"))
    assert [(t.name, t.aliases) for t in pruner.targets] == [("a.weight", ("b.weight",)), ("c.weight", ())]
    opt.step()
    # one global threshold over the distinct tensors, as torch.nn.utils.prune selects it
    reference = _Tied()
    prune.global_unstructured([(reference.a, "weight"), (reference.c, "weight")], prune.L1Unstructured, amount=0.5)
    assert torch.equal(pruner.mask("b.weight"), reference.a.weight_mask.bool())
    assert torch.equal(pruner.mask("a"), reference.a.weight_mask.bool())
    assert torch.equal(pruner.mask("b"), reference.a.weight_mask.bool())  # the module of an alias
    assert torch.equal(pruner.mask("c.weight"), reference.c.weight_mask.bool())
    rows = layer_rows(pruner, torch.randn(3, 8))
    assert [r.params for r in rows] == [64, 40]
    assert sum(r.alive_params for r in rows) == 52
    assert rows[0].macs == 2 * 64  # the tensor computes in a and in b
    table = pruner.summary(torch.randn(3, 8))
    assert "a.weight (= b.weight)" in table
    assert table.splitlines()[-1].split()[1:] == ["50.0%", "0/13", "0/16", "52/104", "84/168"]
    assert set(pruner.metrics()) == {"a.weight", "c.weight"}
    small = pruner.export()
    assert small.b.weight is small.a.weight
    torch.testing.assert_close(small.a.weight, model.a.weight.detach() * pruner.mask("a.weight"), rtol=0, atol=0)


def _tied_pruner(model, dead_rows):
    """A Magnitude pruner on ``model`` whose tied ``a.weight`` has all-zero ``dead_rows`` (and zero ``a.bias``)."""
    with torch.no_grad():
        for row in dead_rows:
            model.a.weight[row] = 0
            model.a.bias[row] = 0
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.0, backend="torch")
    pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.3))
    opt.step()
    assert all(not pruner.mask("a.weight")[row].any() for row in dead_rows)
    return pruner


def test_structured_export_keeps_an_encoder_decoder_tie():
    # a's dead output 3 is the tied weight's row 3, but b reads it through column 3: removing it from
    # a alone would untie the weight (or shrink one user of it), so the unit stays
    model = _Tied()
    pruner = _tied_pruner(model, [3])
    x = torch.randn(5, 8)
    small = pruner.export(x, structured=True)
    assert small.a.weight is small.b.weight and small.a.weight.shape == (8, 8)
    assert [name for name, _ in small.named_parameters()] == ["a.weight", "a.bias", "b.bias", "c.weight", "c.bias"]
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))


class _TiedBranches(nn.Module):
    """One weight in two parallel layers whose outputs are added: its rows are outputs of both."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b, self.c = nn.Linear(7, 9), nn.Linear(7, 9), nn.Linear(9, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.relu(self.a(x)) + torch.tanh(self.b(2 * x)))


def test_structured_export_removes_a_tied_row_only_where_every_user_is_dead():
    model = _TiedBranches()
    with torch.no_grad():
        model.b.bias[2] = 0  # row 2: dead in a and in b; row 6: b.bias[6] != 0 keeps b's output 6 alive
    pruner = _tied_pruner(model, [2, 6])
    x = torch.randn(5, 7)
    small = pruner.export(x, structured=True)
    assert small.a.weight is small.b.weight
    keep = [i for i in range(9) if i != 2]
    torch.testing.assert_close(small.a.weight, (model.a.weight * pruner.mask("a.weight"))[keep], rtol=0, atol=0)
    torch.testing.assert_close(small.b.bias, model.b.bias[keep], rtol=0, atol=0)
    assert small.c.weight.shape == (4, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))


def test_structured_export_cuts_a_tied_weight_once_for_both_users():
    model = _TiedBranches()
    x = torch.randn(5, 7)
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.0, backend="torch")
    pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.3, structure="neurons"), example_inputs=x)
    opt.step()
    alive = pruner.alive_units()[0]
    assert int((~alive).sum()) == 3
    small = pruner.export(x)
    assert small.a.weight is small.b.weight
    torch.testing.assert_close(small.a.weight, model.a.weight[alive], rtol=0, atol=0)
    assert small.c.weight.shape == (4, 6)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))


def test_uncoupled_filters_of_a_tied_weight_mask_every_user_bias():
    # coupled=False: a filter of the tied weight is a filter of b too, so b's bias entry goes with it
    model = _TiedBranches()
    x = torch.randn(5, 7)
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.0, backend="torch")
    method = methods.Magnitude(0.3, structure="filters")
    pruner = sparsetrain.Pruner(model, opt, method, include=["a"], coupled=False)
    assert [t.name for t in pruner.targets] == ["a.weight", "a.bias", "b.bias"]
    opt.step()
    alive = pruner.alive_units()[0]
    assert int((~alive).sum()) == 3
    assert torch.equal(pruner.mask("b.bias"), alive) and torch.equal(pruner.mask("a.bias"), alive)
    small = pruner.export(x)
    assert small.a.weight is small.b.weight and small.b.bias.shape == (6,)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))


def test_modules_sharing_a_weight_with_different_ratios_are_refused():
    model = _Tied()
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.0, backend="torch")
    with pytest.raises(ValueError, match=r"b.weight is the same tensor as a.weight \(tied weights\)"):
        sparsetrain.Pruner(model, opt, methods.Magnitude(0.5), ratios={"b": 0.3})
    assert opt.pruner is None and "mask_words" not in opt.state[model.a.weight]


def test_a_masked_pruner_masks_a_tied_weight_once_in_every_module():
    model = _Tied()
    pruner = MaskedPruner(model, methods.Magnitude(0.5), backend="torch")
    assert [t.name for t in pruner.targets] == ["a.weight", "c.weight"]
    alive = pruner.mask("b.weight")
    assert alive.sum() == 32
    for layer in (model.a, model.b):
        assert len(layer.parametrizations.weight) == 1
        torch.testing.assert_close(layer.weight, model.a.parametrizations.weight.original * alive, rtol=0, atol=0)
    x = torch.randn(3, 8)
    model(x).sum().backward()
    grad = model.a.parametrizations.weight.original.grad
    assert torch.equal(grad[~alive], torch.zeros(int((~alive).sum())))
    assert grad[alive].abs().sum() > 0
    from sparsetrain.summary import layer_rows

    assert sum(r.params for r in layer_rows(pruner)) == 64 + 40


class _Recurrent(nn.Module):
    """An LSTM with projections (two layers, both directions), a GRU and self-attention."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lstm = nn.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
        self.gru = nn.GRU(6, 6, batch_first=True)
        self.att = nn.MultiheadAttention(6, 2, batch_first=True)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        h = self.gru(self.lstm(x)[0])[0]
        return self.fc(self.att(h, h, h)[0].mean(1))


@pytest.mark.parametrize(
    "select", [{"types": (nn.LSTM, nn.GRU, nn.MultiheadAttention)}, {"include": ["lstm", "gru", "att"]}]
)
def test_recurrent_and_attention_weight_matrices_are_pruned_when_selected(select):
    """nn.LSTM / nn.GRU keep their matrices as weight_ih_l{k} / weight_hh_l{k} (weight_hr_l{k} with proj_size,
    *_reverse both ways), nn.MultiheadAttention as in_proj_weight: selecting such a module prunes them (they were
    skipped, silently with types=), one-shot as torch.nn.utils.prune.l1_unstructured selects, and the autograd
    path's forward computes with them masked."""
    model, x = _Recurrent(), torch.randn(3, 4, 5)
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1)
    pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.5), **select)
    lstm = [f"lstm.weight_{k}_l{i}{r}" for i in range(2) for r in ("", "_reverse") for k in ("ih", "hh", "hr")]
    assert sorted(t.name for t in pruner.targets) == sorted(lstm + ["gru.weight_ih_l0", "gru.weight_hh_l0",
                                                                    "att.in_proj_weight"])  # fmt: skip
    plain, masked = _Recurrent(), _Recurrent()
    masked_pruner = MaskedPruner(masked, methods.Magnitude(0.5), **select)
    for t in pruner.targets:
        holder = nn.Linear(1, 1)
        holder.weight = nn.Parameter(dict(plain.named_parameters())[t.name].detach().clone())
        torch_prune.l1_unstructured(holder, "weight", amount=0.5)
        expected = holder.weight_mask.bool()
        assert torch.equal(opt.mask(t.param), expected), t.name
        assert torch.equal(masked_pruner.mask(t.name), expected), t.name
        with torch.no_grad():
            dict(plain.named_parameters())[t.name].mul_(expected)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(masked(x), plain(x), rtol=0, atol=0)  # the masked forward, parametrized matrices
    torch.testing.assert_close(pruner.export()(x), plain(x), rtol=0, atol=0)
    assert "lstm.weight_hr_l1_reverse" in pruner.summary()


def test_structured_pruning_names_a_module_whose_matrices_are_not_its_weight():
    model = nn.Sequential(nn.LSTM(4, 6))
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"0 \(LSTM: weight_ih_l0, weight_hh_l0\) keeps its weight matrices under"):
        sparsetrain.Pruner(model, opt, methods.Magnitude(0.5, structure="filters"), coupled=False, include=["0"])


def test_uncoupled_filters_of_a_transposed_convolution_are_its_output_channels():
    """ConvTranspose2d keeps its weight as [in, out / groups, kh, kw]: coupled=False filters are dim 1 with their
    bias (groups=1, as ln_structured(dim=1) selects), exported smaller and exact; a grouped one, whose output channels
    lie along no single dim, is refused by name before anything changes (it masked two channels per unit)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 12, 2, stride=2), nn.ReLU(), nn.Conv2d(12, 2, 1)
    )
    x = torch.randn(2, 3, 5, 5)
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1)
    weight = model[2].weight.detach().clone()
    pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.5, structure="filters"), include=["2"], coupled=False)
    holder = nn.Linear(1, 1)
    holder.weight = nn.Parameter(weight)
    torch_prune.ln_structured(holder, "weight", amount=0.5, n=1, dim=1)
    assert torch.equal(opt.mask(model[2].weight), holder.weight_mask.bool())
    dead = (model[2].weight == 0).all(dim=(0, 2, 3))
    assert int(dead.sum()) == 6 and torch.equal(model[2].bias == 0, dead)
    small = pruner.export(x)
    assert small[2].weight.shape == (8, 6, 2, 2) and small[4].weight.shape == (2, 6, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)

    grouped = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ConvTranspose2d(8, 12, 2, stride=2, groups=2))
    opt = sparsetrain.optim.SGD(grouped.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"1: a grouped transposed convolution \(groups=2\)"):
        sparsetrain.Pruner(grouped, opt, methods.Magnitude(0.5, structure="filters"), include=["1"], coupled=False)
    assert not any("mask_words" in s for s in opt.state.values()) and not (grouped[1].weight == 0).any()


def test_structured_export_names_a_model_it_cannot_run():
    """A removal Torch-Pruning re-groups wrongly (filters feeding a grouped transposed convolution) is a clear
    refusal, not torch's shape error; a changed output shape is named as such."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 12, 2, stride=2, groups=2))
    x = torch.randn(2, 3, 5, 5)
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1)
    pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.5, structure="filters"), include=["0"], coupled=False)
    with pytest.raises(RuntimeError, match=r"structured export made a model that cannot run on example_inputs"):
        pruner.export(x)
    head = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = sparsetrain.optim.SGD(head.parameters(), lr=0.1)
    pruner = sparsetrain.Pruner(head, opt, methods.Magnitude(0.5, structure="filters"), include=["2"], coupled=False)
    with pytest.raises(RuntimeError, match=r"output shapes \[\(5, 1\)\] instead of \[\(5, 3\)\]"):
        pruner.export(torch.randn(5, 4))


def _conv1d(nx, nf):
    return pytest.importorskip("transformers.pytorch_utils").Conv1D(nf, nx)


@pytest.mark.parametrize("kind", ["conv_transpose", "conv1d"])
def test_layers_storing_outputs_along_dim_1_count_dead_outputs_and_inputs_as_they_compute(kind):
    """ConvTranspose2d keeps its weight as [in, out, kh, kw] and transformers' Conv1D as [in, out]: summary(),
    metrics() and the history count dead outputs and inputs on the module's outputs and inputs (summary() and
    metrics() read dim 0 as outputs, and only summary() swapped for Conv1D), and a transposed convolution's MACs
    are its weights times its input positions (they were counted per output position of dim 0)."""
    torch.manual_seed(0)
    if kind == "conv_transpose":
        layer, x, macs = nn.ConvTranspose2d(8, 12, 2, stride=2), torch.randn(2, 8, 5, 5), 25 * 8 * 12 * 4
    else:
        layer, x, macs = _conv1d(8, 12), torch.randn(2, 3, 8), 3 * 8 * 12
    model = nn.Sequential(layer)
    with torch.no_grad():
        layer.weight[:, 1].zero_()  # output 1 dead (both store outputs along dim 1)
        layer.weight[:, 4].zero_()  # output 4 dead
        layer.weight[3].zero_()  # input 3 dead
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="already"):
        pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.01), include=["0"], record_every=1)
    from sparsetrain.summary import layer_rows

    row = layer_rows(pruner, x)[0]
    assert (row.dead_outputs, row.outputs, row.dead_inputs, row.inputs) == (2, 12, 1, 8)
    assert row.macs == macs
    metrics = pruner.metrics()["0.weight"]
    assert metrics["dead_outputs"] == pytest.approx(2 / 12) and metrics["dead_inputs"] == pytest.approx(1 / 8)
    pruner.history.record(0)
    recorded = pruner.history.as_dict()["layers"]["0.weight"]
    assert recorded["dead_outputs"] == [pytest.approx(2 / 12)] and recorded["dead_inputs"] == [pytest.approx(1 / 8)]


class _RecurrentHead(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.gru, self.fc = nn.Linear(5, 6), nn.GRU(6, 7, batch_first=True), nn.Linear(7, 2)

    def forward(self, x):
        return self.fc(self.gru(torch.relu(self.inp(x)))[0][:, -1])


@pytest.mark.parametrize("path", ["fused", "masked"])
def test_a_model_with_a_pruned_gru_exports_and_deep_copies(path):
    """A Linear feeding an nn.GRU: Torch-Pruning's walk through the GRU ends in an IndexError, which structured
    export now reads as "keep these outputs"; a GRU under MaskedPruner caches its masked weights (non-leaf
    tensors) in _flat_weights after a forward, which made copy.deepcopy, AveragedModel and export fail."""
    model, x = _RecurrentHead(), torch.randn(3, 4, 5)
    select = {"types": (nn.Linear, nn.GRU), "exclude": ["fc"]}
    if path == "fused":
        pruner = sparsetrain.Pruner(model, sparsetrain.optim.SGD(model.parameters(), lr=0.1), methods.Magnitude(0.7),
                                    **select)  # fmt: skip
    else:
        pruner = MaskedPruner(model, methods.Magnitude(0.7), **select)
    assert [t.name for t in pruner.targets] == ["inp.weight", "gru.weight_ih_l0", "gru.weight_hh_l0"]
    expected = model(x)
    copied = copy.deepcopy(model)
    averaged = torch.optim.swa_utils.AveragedModel(model)
    small = pruner.export(x, structured=True)
    for other in (copied, averaged, small):
        torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-6)
    assert int((small.gru.weight_hh_l0 == 0).sum()) == round(0.7 * small.gru.weight_hh_l0.numel())
