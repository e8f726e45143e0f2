"""Bad input: every refused call names what is wrong and leaves every tensor and counter as it was.

Each test snapshots the parameters, gradients, optimizer state, step counts, param groups and (where
there is one) the pruner's state, makes the call, checks the error, and compares everything exactly.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import triton_usable
from helpers import make_params, set_grads
from torch import nn

import sparsetrain
from sparsetrain import contract
from sparsetrain.methods import GReg1, Magnitude, SelectiveDecay, StochasticMagnitude

NAN = float("nan")


def _copy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return copy.deepcopy(value)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return bool(((a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else (a == b)).all())
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


class Snapshot:
    """Everything a call could change: tensors (by value), their identities, counters, groups, pruner state."""

    def __init__(self, opt, pruner=None, model=None):
        self.opt, self.pruner, self.model = opt, pruner, model
        self.taken = self._take()

    def _take(self):
        opt = self.opt
        params = [p for g in opt.param_groups for p in g["params"]]
        out = {
            "param_ids": [id(p) for p in params],
            "params": [p.detach().clone() for p in params],
            "grads": [None if p.grad is None else p.grad.detach().clone() for p in params],
            "grad_ids": [id(p.grad) for p in params],
            "state_keys": sorted(id(p) for p in opt.state),
            "state": {id(p): _copy(s) for p, s in opt.state.items()},
            "groups": [_copy({k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups],
            "counters": (opt.prune_events, opt.base_seed, opt.regularize, opt.uses_groups, opt._pending_prune),
        }
        if self.pruner is not None:
            out["pruner"] = (
                self.pruner.step_count,
                _copy(self.pruner.method.state_dict()),
                len(self.pruner.history.steps),
            )
        if self.model is not None:
            out["model"] = _copy(self.model.state_dict())
        return out

    def unchanged(self) -> None:
        now = self._take()
        for key, before in self.taken.items():
            assert _same(before, now[key]), f"{key} changed"


def _opt(name="SGD", shapes=((7, 5), (33,), (2, 3, 3)), backend="torch", **kw):
    params = make_params(shapes)
    defaults = {"SGD": {"lr": 0.1, "momentum": 0.9}, "Adam": {"lr": 1e-2}}[name]
    opt = getattr(sparsetrain.optim, name)(params, backend=backend, **{**defaults, **kw})
    return opt, params


def _stepped(name="SGD", pruning=True, backend="torch", **kw):
    opt, params = _opt(name, backend=backend, **kw)
    if pruning:
        for p in params[:2]:
            opt.enable_pruning(p)
            opt.set_coefs(p, l2=1e-3, threshold=0.3)
    for step in range(2):
        set_grads([params], step)
        opt.schedule_pruning("low" if pruning and step == 1 else "none")
        opt.step()
    set_grads([params], 7)
    return opt, params


# ------------------------------------------------------------------------------ hyperparameters
@pytest.mark.parametrize(
    "name, bad, match",
    [
        ("SGD", {"lr": -1.0}, "lr must be >= 0"),
        ("SGD", {"lr": NAN}, "lr must be a finite number"),
        ("SGD", {"momentum": -0.5}, "momentum must be >= 0"),
        ("SGD", {"momentum": 0.9, "dampening": 0.1, "nesterov": True}, "Nesterov"),
        ("SGD", {"weight_decay": -1e-4}, "weight_decay must be >= 0"),
        ("Adam", {"betas": (1.0, 0.999)}, "beta parameter at index 0 must be < 1"),
        ("Adam", {"betas": (0.9, 1.5)}, "beta parameter at index 1 must be < 1"),
        ("Adam", {"eps": -1e-8}, "epsilon must be >= 0"),
        ("Adam", {"betas": (0.9, NAN)}, "beta parameter at index 1 must be a finite number"),
    ],
)
def test_add_param_group_validates_like_the_constructor_and_keeps_nothing(name, bad, match):
    opt, params = _stepped(name, pruning=False)
    with pytest.raises(ValueError, match=match):
        getattr(sparsetrain.optim, name)(make_params([(3,)]), **bad)  # the constructor refuses it
    extra = make_params([(4, 4)], seed=3)
    snap = Snapshot(opt)
    with pytest.raises(ValueError, match=f"param group 1: .*{match}"):
        opt.add_param_group({"params": extra, **bad})
    snap.unchanged()
    assert len(opt.param_groups) == 1 and extra[0] not in opt.state
    opt.step()  # the optimizer still works, and does not climb
    assert all(torch.isfinite(p).all() for p in params)


def test_duplicate_parameters_are_refused():
    (p, q) = make_params([(4, 3), (5,)])
    with pytest.raises(ValueError, match=r"parameter 2 of param group 0 \(shape \(4, 3\).*same tensor as parameter 0"):
        sparsetrain.optim.SGD([p, q, p], lr=0.1)
    opt = sparsetrain.optim.SGD([p], lr=0.1)
    snap = Snapshot(opt)
    with pytest.raises(ValueError, match="parameter 1 of param group 1 .* same tensor as parameter 0 of param group 0"):
        opt.add_param_group({"params": [q, p]})
    snap.unchanged()
    assert len(opt.param_groups) == 1


# ------------------------------------------------------------------------------ method arguments
@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: StochasticMagnitude(0.5, l1=NAN), "l1 must be a finite number"),
        (lambda: StochasticMagnitude(0.5, l2=-1e-3), "l2 must be >= 0"),
        (lambda: StochasticMagnitude(0.5, temperature=NAN), "temperature must be a finite number"),
        (lambda: StochasticMagnitude(0.5, interval=-2), "interval must be >= 1"),
        (lambda: SelectiveDecay(0.5, sd=NAN), "sd must be a finite number"),
        (lambda: SelectiveDecay(0.5, beta=-1.0), "beta must be > 0"),
        (lambda: SelectiveDecay(0.5, interval=2.5), "interval must be an integer"),
        (lambda: Magnitude(0.5, schedule="linear", end=10, interval=-1), "interval must be >= 1"),
        (lambda: Magnitude(0.5, norm=NAN), "norm must be"),
        (lambda: GReg1(0.5, delta=NAN), "delta must be a finite number"),
        (lambda: GReg1(0.5, ceiling=-1.0), "ceiling must be > 0"),
        (lambda: GReg1(0.5, update_interval=0), "update_interval must be >= 1"),
        (lambda: Magnitude("0.5"), "target must be a real number, got str"),
        (lambda: StochasticMagnitude(True), "target must be a real number, got bool"),
    ],
)
def test_methods_refuse_nan_and_negative_arguments(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


# ------------------------------------------------------------------------ pruning entry points
def test_enable_pruning_refuses_a_zero_group_inner():
    opt, params = _stepped(pruning=False)
    snap = Snapshot(opt)
    with pytest.raises(ValueError, match=r"enable_pruning\(parameter 0 of param group 0\): group_inner must be >= 1"):
        opt.enable_pruning(params[0], groups=5, group_inner=0)
    with pytest.raises(ValueError, match="3 groups do not divide a tensor of 35 elements"):
        opt.enable_pruning(params[0], groups=3)
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.enable_pruning(torch.zeros(3, requires_grad=True))
    snap.unchanged()


def test_set_coefs_checks_every_value_before_writing_any():
    opt, params = _stepped()
    snap = Snapshot(opt)
    with pytest.raises(ValueError, match=r"set_coefs\(parameter 0 of param group 0\): unknown coefficient 'l3'"):
        opt.set_coefs(params[0], l2=0.5, l1=0.25, l3=1.0)
    with pytest.raises(ValueError, match="l1 must be a finite number"):
        opt.set_coefs(params[0], l2=0.5, l1=NAN)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        opt.set_coefs(params[1], temperature=-1.0)
    with pytest.raises(ValueError, match=r"parameter 2 of param group 0\): pruning is not enabled"):
        opt.set_coefs(params[2], l2=0.5)
    snap.unchanged()


def test_set_mask_with_a_wrong_mask_changes_nothing():
    opt, params = _stepped()
    snap = Snapshot(opt)
    with pytest.raises(ValueError, match=r"set_mask\(parameter 2 of param group 0\): mask shape \(3, 2, 3\)"):
        opt.set_mask(params[2], torch.ones(3, 2, 3, dtype=torch.bool))  # params[2] has no mask yet
    with pytest.raises(TypeError, match="the mask must be a bool tensor, got a torch.float32 tensor"):
        opt.set_mask(params[0], torch.ones(7, 5))
    snap.unchanged()
    assert "mask_words" not in opt.state[params[2]]


def test_schedule_group_pruning_without_group_tables_is_refused():
    opt, params = _stepped()
    snap = Snapshot(opt)
    with pytest.raises(ValueError, match="schedule_pruning\\('group'\\) needs per-group tables"):
        opt.schedule_pruning("group")
    with pytest.raises(ValueError, match="unknown prune mode 'lowest'"):
        opt.schedule_pruning("lowest")
    snap.unchanged()


def test_pruner_whose_bias_is_not_in_the_optimizer_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3))
    opt = sparsetrain.optim.SGD([model[0].weight, model[2].weight, model[2].bias], lr=0.1, backend="torch")
    snap = Snapshot(opt, model=model)
    with pytest.raises(ValueError, match=r"0\.bias \(6,\) is not a parameter of the optimizer"):
        sparsetrain.Pruner(model, opt, Magnitude(0.5, structure="filters"), example_inputs=torch.randn(1, 3, 8, 8))
    snap.unchanged()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_pruner_over_a_frozen_layer_left_out_of_the_optimizer_names_the_exclusion():
    """The usual fine-tuning optimizer, SGD(p for p in model.parameters() if p.requires_grad): the frozen layer
    is not the optimizer's, and the refusal says how to leave it out of pruning."""
    model = _mlp()
    model[0].requires_grad_(False)
    opt = sparsetrain.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, backend="torch")
    snap = Snapshot(opt, model=model)
    frozen = r"0\.weight \(16, 8\) is not a parameter of the optimizer \(requires_grad=False.*exclude=\['0'\]"
    with pytest.raises(ValueError, match=frozen):
        sparsetrain.Pruner(model, opt, Magnitude(0.5))
    snap.unchanged()
    pruner = sparsetrain.Pruner(model, opt, Magnitude(0.5), exclude=["0"])
    assert [t.name for t in pruner.targets] == ["2.weight"]


def _embedding_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(20, 8, sparse=True), nn.Flatten(), nn.Linear(40, 3))


def test_a_refused_step_leaves_the_pruners_schedule_as_it_was():
    """A step refused for its gradients (an nn.Embedding(sparse=True) in the optimizer) is refused before the
    attached Pruner schedules it: the method's state, the pending event and the step count are as before, and
    once the embedding makes dense gradients the run equals one that never met the refusal. (The schedule ran
    first: Magnitude counted an event that never happened.)"""
    tokens = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(1))

    def build():
        model = _embedding_model()
        opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, backend="torch")
        method = Magnitude(0.5, schedule="linear", start=0, end=4, interval=1)
        return model, opt, sparsetrain.Pruner(model, opt, method, include=["2"])

    model, opt, pruner = build()
    method_state, before = _copy(pruner.method.state_dict()), [p.detach().clone() for p in model.parameters()]
    model(tokens).sum().backward()
    with pytest.raises(RuntimeError, match=r"parameter 0 of param group 0 .* has a sparse gradient"):
        opt.step()
    assert _same(pruner.method.state_dict(), method_state)
    assert (pruner.step_count, opt._pending_prune, opt.prune_events) == (0, "none", 0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    model[0].sparse = False
    reference, reference_opt, reference_pruner = build()
    reference[0].sparse = False
    for run_model, run_opt in ((model, opt), (reference, reference_opt)):
        for _ in range(5):
            run_opt.zero_grad()
            run_model(tokens).sum().backward()
            run_opt.step()
    assert torch.equal(opt.mask(model[2].weight), reference_opt.mask(reference[2].weight))
    assert pruner.step_count == reference_pruner.step_count == 5


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize(
    "args, error, match",
    [
        ({"method": Magnitude}, TypeError, "got the class Magnitude: call it"),
        ({"method": "magnitude"}, TypeError, "method must be one of sparsetrain.methods"),
        ({"model": None}, TypeError, "model must be a torch.nn.Module, got NoneType"),
        ({"ratios": [0.5]}, TypeError, "ratios must be a dict"),
        ({"include": [0]}, TypeError, "include must be a module-name pattern"),
        ({"exclude": 2}, TypeError, "exclude must be a module-name pattern"),
        ({"types": "Linear"}, TypeError, "types must be a tuple of module classes"),
        ({"example_inputs": torch.randn(2, 5)}, ValueError, "cannot run on example_inputs .*mat1 and mat2"),
    ],
)
@pytest.mark.parametrize("path", ["fused", "autograd"])
def test_pruner_arguments_of_the_wrong_kind_are_named_and_change_nothing(path, args, error, match):
    model = _mlp()
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1, backend="torch")
    method = GReg1(0.5) if "example_inputs" in args else Magnitude(0.5)
    call = {"model": model, "method": method, **args}
    snap = Snapshot(opt, model=model)
    with pytest.raises(error, match=match):
        if path == "fused":
            sparsetrain.Pruner(call.pop("model"), opt, call.pop("method"), **call)
        else:
            sparsetrain.autograd.MaskedPruner(call.pop("model"), call.pop("method"), **call)
    snap.unchanged()
    assert opt.pruner is None and not any(hasattr(m, "parametrizations") for m in model.modules())


def test_a_single_pattern_string_and_a_single_type_select_like_a_list_of_one():
    """``include="2"`` is the pattern "2" (not the characters of a string), ``types=nn.Linear`` is ``(nn.Linear,)``."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1, backend="torch")
    pruner = sparsetrain.Pruner(model, opt, Magnitude(0.5), include="4", types=nn.Linear)
    assert [t.name for t in pruner.targets] == ["4.weight"]
    pruner.remove()
    pruner = sparsetrain.Pruner(model, opt, Magnitude(0.5), exclude="4", types=nn.Linear)
    assert [t.name for t in pruner.targets] == ["0.weight", "2.weight"]


def test_a_second_masked_pruner_on_the_same_model_is_refused_by_name():
    model = _mlp()
    sparsetrain.autograd.MaskedPruner(model, Magnitude(0.5))
    for build in (
        lambda: sparsetrain.autograd.MaskedPruner(model, Magnitude(0.5)),
        lambda: sparsetrain.Pruner(model, sparsetrain.optim.SGD(model.parameters(), lr=0.1), Magnitude(0.5)),
    ):
        with pytest.raises(ValueError, match=r"already masked by a MaskedPruner \(0\.weight"):
            build()


def test_a_weight_already_pruned_by_an_attached_pruner_is_refused_by_name():
    """A MaskedPruner on a model a fused Pruner already pruned was accepted: two schedules and two sets of
    masks on the same weights (the reverse order was refused). Two optimizers holding one weight likewise."""
    model = _mlp()
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1, backend="torch")
    pruner = sparsetrain.Pruner(model, opt, Magnitude(0.5), exclude=["2"])
    snap = Snapshot(opt, pruner, model)
    second = sparsetrain.optim.SGD(model[0].parameters(), lr=0.1, backend="torch")
    for build in (
        lambda: sparsetrain.autograd.MaskedPruner(model, Magnitude(0.5)),
        lambda: sparsetrain.Pruner(model, second, Magnitude(0.5), include=["0"]),
    ):
        with pytest.raises(
            ValueError, match=r"0\.weight is already pruned by another Pruner .*call its remove\(\) first"
        ):
            build()
    snap.unchanged()
    assert second.pruner is None and not any(hasattr(m, "parametrizations") for m in model.modules())
    third = sparsetrain.optim.SGD(model[2].parameters(), lr=0.1, backend="torch")
    assert sparsetrain.Pruner(model, third, Magnitude(0.3), include=["2"]).targets[0].name == "2.weight"  # disjoint
    del opt, pruner, snap  # an optimizer and its Pruner nothing refers to (a cycle) do not hold the weight
    assert sparsetrain.Pruner(model, second, Magnitude(0.5), include=["0"]).targets[0].name == "0.weight"
    second.pruner.remove()
    masked = sparsetrain.autograd.MaskedPruner(model, Magnitude(0.5), include=["0"])
    assert [t.name for t in masked.targets] == ["0.weight"]


@pytest.mark.parametrize("path", ["fused", "autograd"])
def test_one_method_object_driving_two_pruners_is_refused(path):
    """A shared GReg1 advanced its phase once per pruner and step: the first model was never pruned."""
    method = GReg1(0.5, update_interval=1, delta=0.05, stabilize=2, ceiling=0.2)
    x = torch.randn(4, 8)

    def attach(model):
        if path == "autograd":
            return sparsetrain.autograd.MaskedPruner(model, method, example_inputs=x)
        return sparsetrain.Pruner(model, sparsetrain.optim.SGD(model.parameters(), lr=0.1), method, example_inputs=x)

    first = attach(_mlp())
    second_model = _mlp()
    opt = sparsetrain.optim.SGD(second_model.parameters(), lr=0.1, backend="torch")
    snap = Snapshot(opt, model=second_model)
    with pytest.raises(ValueError, match="this GReg1 object already drives another Pruner"):
        sparsetrain.Pruner(second_model, opt, method, example_inputs=x)
    snap.unchanged()
    assert opt.pruner is None
    first.remove()
    assert sparsetrain.Pruner(second_model, opt, method, example_inputs=x).method is method


@pytest.mark.parametrize("saved_by", ["sparsetrain", "torch.optim"])
def test_a_checkpoint_without_pruning_state_into_a_pruned_optimizer_is_refused(saved_by):
    """A dense checkpoint loaded after the Pruner used to drop its masks: the next step raised KeyError 'stats'."""
    model = _mlp()
    dense_class = sparsetrain.optim.SGD if saved_by == "sparsetrain" else torch.optim.SGD
    dense = dense_class(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 8)).sum().backward()
    dense.step()
    checkpoint = dense.state_dict()
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, backend="torch")
    pruner = sparsetrain.Pruner(model, opt, StochasticMagnitude(0.5, start=1, end=3))
    snap = Snapshot(opt, pruner, model)
    with pytest.raises(ValueError, match="no pruning state for 0.weight .* load it before creating the Pruner"):
        opt.load_state_dict(checkpoint)
    snap.unchanged()
    pruner.remove()
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, backend="torch")
    opt.load_state_dict(checkpoint)  # the order the message names
    pruner = sparsetrain.Pruner(model, opt, StochasticMagnitude(0.5, start=1, end=3))
    torch.testing.assert_close(opt.state[model[0].weight]["momentum_buffer"], model[0].weight.grad)
    for _ in range(4):
        opt.step()
    assert pruner.step_count == 4 and not opt.mask(model[0].weight).all()


def test_masked_pruner_step_refuses_what_is_not_an_optimizer():
    model = _mlp()
    pruner = sparsetrain.autograd.MaskedPruner(model, Magnitude(0.5, schedule="linear", end=4, interval=1))
    with pytest.raises(TypeError, match="takes the optimizers .* got str 'opt'"):
        pruner.step("opt")
    assert pruner.step_count == 0


# ----------------------------------------------------------------------------------- gradients
def _backends():
    return ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_usable()[0], reason="no triton"))]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", ["fp16_grad_on_fp32", "resized", "fp32_grad_on_bf16"])
def test_a_gradient_that_does_not_match_its_parameter_is_refused_before_any_update(backend, case):
    opt, params = _stepped(backend=backend)
    if case == "fp32_grad_on_bf16":
        extra = make_params([(6, 2)], seed=4, dtype=torch.bfloat16)[0]
        extra.grad_dtype = torch.float32  # torch lets such a parameter hold a float32 gradient
        opt.add_param_group({"params": [extra]})
        extra.grad = torch.ones(6, 2)
        label, expected = "parameter 0 of param group 1", r"shape \(6, 2\), dtype torch.bfloat16"
    elif case == "fp16_grad_on_fp32":
        params[1].grad.data = params[1].grad.data.half()
        label, expected = "parameter 1 of param group 0", r"shape \(33,\), dtype torch.float32"
    else:
        params[2].grad.data = torch.zeros(4)
        label, expected = "parameter 2 of param group 0", r"shape \(2, 3, 3\), dtype torch.float32"
    snap = Snapshot(opt)
    with pytest.raises(RuntimeError, match=f"{label} \\({expected}.*has a gradient of .*its parameter's shape, dtype"):
        opt.step()
    snap.unchanged()


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", ["expanded", "interleaved"])
def test_a_parameter_whose_elements_share_memory_is_refused_before_any_update(backend, case):
    opt, params = _stepped(backend=backend, momentum=0.9)
    if case == "expanded":  # stride 0: the torch reference used to update step and momentum, then raise
        extra, strides = torch.zeros(1, 4).expand(3, 4).requires_grad_(), r"\(0, 1\)"
    else:
        extra, strides = torch.zeros(16).as_strided((3, 3), (2, 1)).requires_grad_(), r"\(2, 1\)"
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.ones(3, 3 if case == "interleaved" else 4)
    snap = Snapshot(opt)
    match = "parameter 0 of param group 1" + (r" \(shape.*strides " + strides if backend == "torch" else "")
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    snap.unchanged()


@pytest.mark.skipif(not triton_usable()[0], reason="needs the Triton backend")
@pytest.mark.parametrize("case", ["fp64", "stride0"])
def test_a_later_group_the_triton_backend_cannot_step_is_refused_before_any_launch(case):
    opt, params = _stepped(backend="triton")
    if case == "fp64":
        extra = make_params([(5, 3)], seed=2, dtype=torch.float64)[0]
        match = r"parameter 0 of param group 1 \(shape \(5, 3\), dtype torch.float64\).*fp32, bf16 and fp16"
    else:  # other dense layouts step (tests/test_layouts.py); elements that share memory cannot
        extra = torch.zeros(1).expand(6).requires_grad_()
        match = r"parameter 0 of param group 1 \(shape \(6,\).*strides \(0,\): some of its elements share memory"
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.ones_like(extra)
    snap = Snapshot(opt)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    snap.unchanged()


def test_skip_nonfinite_with_a_zero_element_parameter():
    params = make_params([(7, 5), (0,), (3, 0)])
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    opt = sparsetrain.optim.SGD(params, lr=0.1, momentum=0.9, backend="torch", skip_nonfinite=True)
    ref = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9)
    for step in range(3):
        set_grads([params, ref_params], step)
        opt.step()
        ref.step()
    torch.testing.assert_close(params[0], ref_params[0], rtol=0, atol=0)
    params[0].grad[0, 0] = float("inf")
    snap = Snapshot(opt)
    opt.step()
    snap.unchanged()


# ---------------------------------------------------------------------------------- checkpoints
def _corrupt(sd, case):
    st, pruned = sd["state"], sd["state"][1]  # parameter 1 (35 elements) has a partial last mask word
    if case == "words_short":
        pruned["mask_words"] = pruned["mask_words"][:-1]
    elif case == "words_long":
        pruned["mask_words"] = torch.cat([pruned["mask_words"], torch.zeros(1, dtype=torch.int32)])
    elif case in ("words_int64", "words_float32", "words_bool"):
        pruned["mask_words"] = pruned["mask_words"].to(getattr(torch, case.split("_")[1]))
    elif case == "words_padding":
        pruned["mask_words"][-1] = -1  # 35 elements: bits past element 34 are set
    elif case == "stats_float32":
        pruned["stats"] = pruned["stats"].float()
    elif case == "stats_3":
        pruned["stats"] = pruned["stats"][:3]
    elif case == "stats_nan":
        pruned["stats"][contract.STAT_SUM_ABS_W] = NAN
    elif case == "coefs_4":
        pruned["coefs"] = pruned["coefs"][:4]
    elif case == "coefs_nan":
        pruned["coefs"][contract.COEF_L1] = NAN
    elif case == "group_inner_0":
        pruned["group_inner"] = 0
    elif case == "group_coefs_1d":
        pruned["group_coefs"] = pruned["group_coefs"][0]
    elif case in ("no_mask_words", "no_stats", "no_coefs"):
        del pruned[case[3:]]
    elif case == "momentum_int":
        st[2]["momentum_buffer"] = st[2]["momentum_buffer"].long()
    elif case == "momentum_shape":
        st[2]["momentum_buffer"] = st[2]["momentum_buffer"].reshape(-1)
    elif case == "unknown_key":
        st[1]["momentum_bufer"] = st[1]["momentum_buffer"]
    elif case == "step_nan":
        st[1]["step"] = torch.tensor(NAN)
    elif case == "group_without_momentum":
        del sd["param_groups"][0]["momentum"]
    elif case == "group_bad_lr":
        sd["param_groups"][0]["lr"] = -0.1
    elif case == "unknown_param_id":
        st[17] = st.pop(2)
    return sd


CORRUPTIONS = {
    "words_short": r"parameter 1 of param group 0: state 'mask_words' is shape \(1,\).*torch.int32, shape \(2,\)",
    "words_long": r"'mask_words' is shape \(3,\)",
    "words_int64": r"'mask_words' is shape \(2,\), dtype torch.int64",
    "words_float32": r"'mask_words' is shape \(2,\), dtype torch.float32",
    "words_bool": r"'mask_words' is shape \(2,\), dtype torch.bool",
    "words_padding": "bits set past the tensor's 35 elements",
    "stats_float32": r"'stats' is shape \(5,\), dtype torch.float32; expected dtype torch.float64",
    "stats_3": r"'stats' is shape \(3,\)",
    "stats_nan": "'stats' holds",
    "coefs_4": r"'coefs' is shape \(4,\)",
    "coefs_nan": "l1 must be a finite number",
    "group_inner_0": "'group_inner' must be >= 1",
    "group_coefs_1d": r"'group_coefs' must be a float32 tensor of shape \(2, G\)",
    "no_mask_words": r"pruning state has .* but lacks \['mask_words'\]",
    "no_stats": r"lacks \['stats'\]",
    "no_coefs": r"lacks \['coefs'\]",
    "momentum_int": r"parameter 2 of param group 0 \(shape \(2, 3, 3\).*'momentum_buffer' must be a floating-point",
    "momentum_shape": r"'momentum_buffer' has shape \(18,\), its parameter \(2, 3, 3\)",
    "unknown_key": r"parameter 1 of param group 0 .*unknown state entries \['momentum_bufer'\]",
    "step_nan": "state 'step' must be a finite number",
    "group_without_momentum": r"param group 0 lacks \['momentum'\]",
    "group_bad_lr": "param group 0: lr must be >= 0",
    "unknown_param_id": "state for parameter id 17, which no param group lists",
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_checkpoint_that_does_not_fit_is_refused_whole(case):
    opt, params = _stepped(shapes=((7, 5), (35,), (2, 3, 3)))
    sd = _corrupt(copy.deepcopy(opt.state_dict()), case)
    snap = Snapshot(opt)
    with pytest.raises((ValueError, TypeError), match=CORRUPTIONS[case]):
        opt.load_state_dict(sd)
    snap.unchanged()
