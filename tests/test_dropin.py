"""Drop-in wherever torch.optim goes: param-group forms, torch.optim's keywords, its state_dicts,
momentum switched on mid-run and tensor learning rates, compared with torch.optim bit for bit."""

import copy

import pytest
import torch
from helpers import clone_params, make_params, set_grads
from torch import nn

import sparsetrain

SHAPES = [(13, 5), (7,), (3, 4, 2)]
KWARGS = {
    "SGD": {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
    "Adam": {"lr": 1e-2, "amsgrad": True, "weight_decay": 1e-2},
    "AdamW": {"lr": 1e-2, "weight_decay": 0.1},
}


def _pair(name, kwargs, shapes=SHAPES, seed=0):
    ours_params = make_params(shapes, seed=seed)
    ref_params = clone_params(ours_params)
    ours = getattr(sparsetrain.optim, name)(ours_params, backend="torch", **kwargs)
    ref = getattr(torch.optim, name)(ref_params, **kwargs)
    return ours, ours_params, ref, ref_params


def _steps(pairs, steps):
    for step in steps:
        set_grads([params for _, params in pairs], step, none_every=4)
        for opt, _ in pairs:
            opt.step()


def _assert_equal(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.detach(), e.detach(), rtol=0, atol=0)


def test_param_group_given_as_a_generator_trains():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    ref = copy.deepcopy(model)
    ours = sparsetrain.optim.SGD([{"params": model.parameters(), "lr": 0.1}], momentum=0.5, backend="torch")
    theirs = torch.optim.SGD([{"params": ref.parameters(), "lr": 0.1}], momentum=0.5)
    assert len(ours.param_groups[0]["params"]) == 2
    x = torch.randn(8, 6)
    for _ in range(3):
        for m, opt in ((model, ours), (ref, theirs)):
            m(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    _assert_equal(model.parameters(), ref.parameters())
    assert not torch.equal(model.weight, copy.deepcopy(nn.Linear(6, 3)).weight)


def test_named_parameters_are_accepted_like_torch_optim():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    ref = copy.deepcopy(model)
    ours = sparsetrain.optim.AdamW(model.named_parameters(), lr=1e-2, backend="torch")
    theirs = torch.optim.AdamW(ref.named_parameters(), lr=1e-2)
    assert ours.param_groups[0]["param_names"] == theirs.param_groups[0]["param_names"]
    x = torch.randn(6, 4)
    for _ in range(4):
        for m, opt in ((model, ours), (ref, theirs)):
            m(x).sum().backward()
            opt.step()
            opt.zero_grad()
    _assert_equal(model.parameters(), ref.parameters())


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_torch_optim_keywords(name):
    kwargs = dict(KWARGS[name], foreach=False, fused=None)
    ours, ours_params, ref, ref_params = _pair(name, kwargs)
    _steps([(ours, ours_params), (ref, ref_params)], range(5))
    _assert_equal(ours_params, ref_params)
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        getattr(sparsetrain.optim, name)(make_params([(3,)]), differentiable=True)
    with pytest.raises(TypeError, match="foreach must be None or a bool"):
        getattr(sparsetrain.optim, name)(make_params([(3,)]), foreach="yes")


def test_adam_decoupled_weight_decay_is_adamw():
    kwargs = {"lr": 1e-2, "weight_decay": 0.2, "decoupled_weight_decay": True}
    ours, ours_params, ref, ref_params = _pair("Adam", kwargs)
    _steps([(ours, ours_params), (ref, ref_params)], range(6))
    _assert_equal(ours_params, ref_params)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_torch_optim_state_dict_loads_here_and_back(name):
    kwargs = KWARGS[name]
    straight, straight_params, _, _ = _pair(name, kwargs)
    _steps([(straight, straight_params)], range(12))

    # torch.optim for 5 steps, then ours from its state_dict for 4, then torch.optim again from ours
    _, ours_params, ref, ref_params = _pair(name, kwargs)
    _steps([(ref, ref_params)], range(5))
    ours = getattr(sparsetrain.optim, name)(ours_params, backend="torch", **kwargs)
    with torch.no_grad():
        for a, b in zip(ours_params, ref_params):
            a.copy_(b)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    _steps([(ours, ours_params)], range(5, 9))
    back = getattr(torch.optim, name)(ref_params, **kwargs)
    with torch.no_grad():
        for a, b in zip(ref_params, ours_params):
            a.copy_(b)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    _steps([(back, ref_params)], range(9, 12))
    _assert_equal(ref_params, straight_params)


def test_torch_state_dict_of_another_algorithm_is_refused():
    params = make_params(SHAPES)
    ref = torch.optim.Adam(clone_params(params), lr=1e-2)
    with pytest.raises(ValueError, match="lacks .*momentum"):
        sparsetrain.optim.SGD(params, lr=0.1).load_state_dict(ref.state_dict())
    with pytest.raises(ValueError, match="saved by torch.optim.Adam, not AdamW"):
        sparsetrain.optim.AdamW(params).load_state_dict(ref.state_dict())


def test_momentum_switched_on_mid_run_matches_torch_optim():
    ours, ours_params, ref, ref_params = _pair("SGD", {"lr": 0.05, "weight_decay": 1e-3, "dampening": 0.3})
    _steps([(ours, ours_params), (ref, ref_params)], range(4))
    for opt in (ours, ref):
        opt.param_groups[0]["momentum"] = 0.9
    _steps([(ours, ours_params), (ref, ref_params)], range(4, 10))
    _assert_equal(ours_params, ref_params)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_tensor_learning_rate_is_bit_identical(name):
    kwargs = dict(KWARGS[name], lr=torch.tensor(KWARGS[name]["lr"] * 1.37))
    ours, ours_params, ref, ref_params = _pair(name, kwargs)
    _steps([(ours, ours_params), (ref, ref_params)], range(50))
    _assert_equal(ours_params, ref_params)


def test_sparsetrain_state_dict_stripped_of_its_entry_still_resumes():
    """Tools that keep only 'state' and 'param_groups' keep the pruning state (first parameter's entry)."""
    params = make_params(SHAPES)
    opt = sparsetrain.optim.SGD(params, lr=0.1, momentum=0.9, backend="torch")
    opt.enable_pruning(params[0])
    opt.set_mask(params[0], torch.rand(params[0].shape, generator=torch.Generator().manual_seed(3)) > 0.5)
    set_grads([params], 0)
    opt.step()
    stripped = {k: v for k, v in opt.state_dict().items() if k in ("state", "param_groups")}
    other_params = clone_params(params)
    other = sparsetrain.optim.SGD(other_params, lr=0.1, momentum=0.9, backend="torch", seed=99)
    other.load_state_dict(stripped)
    assert (other.base_seed, other.prune_events) == (opt.base_seed, opt.prune_events)
    assert torch.equal(other.mask(other_params[0]), opt.mask(params[0]))
    bare = {
        "state": {k: {f: v for f, v in s.items() if f != "sparsetrain"} for k, s in stripped["state"].items()},
        "param_groups": stripped["param_groups"],
    }
    with pytest.raises(ValueError, match="without its 'sparsetrain' entry"):
        other.load_state_dict(bare)


def test_torch_distributed_checkpoint_helpers_resume_pruning_exactly():
    """get_optimizer_state_dict / set_optimizer_state_dict (one process): the resumed run is the uninterrupted one."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 4))
        opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, backend="torch", seed=5)
        method = sparsetrain.methods.StochasticMagnitude(0.6, start=2, end=10, interval=2)
        return model, opt, sparsetrain.Pruner(model, opt, method)

    x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(1)), torch.randn(16, 4)

    def run(model, opt, steps):
        for _ in range(steps):
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()

    straight, straight_opt, _ = build()
    run(straight, straight_opt, 12)
    first, first_opt, _ = build()
    run(first, first_opt, 5)
    saved = copy.deepcopy(get_optimizer_state_dict(first, first_opt))
    assert set(saved) == {"state", "param_groups"}  # the helper drops other top-level keys
    resumed, resumed_opt, resumed_pruner = build()
    resumed.load_state_dict(first.state_dict())
    set_optimizer_state_dict(resumed, resumed_opt, saved)
    assert resumed_pruner.step_count == 5
    run(resumed, resumed_opt, 7)
    for p, q in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    masks = [resumed_opt.mask(t.param) for t in resumed_pruner.targets]
    assert all(torch.equal(m, straight_opt.mask(q)) for m, q in zip(masks, (straight[0].weight, straight[2].weight)))
    assert 0 < sum(int((~m).sum()) for m in masks)  # something was pruned after the resume too


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_float64_parameters_train_with_the_default_backend(name):
    """backend="auto" picked the native kernels on the CPU, which refuse float64, so a float64 model failed at
    its first step with the defaults. "auto" now steps float64 with the torch reference (which computes in
    float32 and rounds once, the contract of every backend); a kernel backend asked for by name still refuses."""
    ours_params = [nn.Parameter(p.detach().double()) for p in make_params(SHAPES, seed=3)]
    ref_params = clone_params(ours_params)
    ours = getattr(sparsetrain.optim, name)(ours_params, backend="auto", **KWARGS[name])
    ref = getattr(torch.optim, name)(ref_params, **KWARGS[name])
    _steps([(ours, ours_params), (ref, ref_params)], range(6))
    for a, e in zip(ours_params, ref_params):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a.detach(), e.detach(), rtol=1e-6, atol=1e-7)
    if sparsetrain.backends.availability("native")[0]:
        native = getattr(sparsetrain.optim, name)(ours_params, backend="native", **KWARGS[name])
        with pytest.raises(RuntimeError, match="dtype Double; the native backend takes float32"):
            native.step()
