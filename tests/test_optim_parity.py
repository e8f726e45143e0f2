"""With no pruning configured, sparsetrain's optimizers give torch.optim's results."""

import pytest
import torch
from helpers import clone_params, make_params, max_rel_err, set_grads
from torch.testing._internal.common_optimizers import (
    optim_inputs_func_adam,
    optim_inputs_func_adamw,
    optim_inputs_func_sgd,
)

import sparsetrain

SHAPES = [(37, 5), (33,), (3, 7, 2), (1,)]


def _torch_cases(name, func, extra):
    cases = [oi.kwargs for oi in func("cpu", None)] + extra
    return [pytest.param(name, dict(kw), id=f"{name}-{i}") for i, kw in enumerate(cases)]


CASES = (
    _torch_cases(
        "SGD",
        optim_inputs_func_sgd,
        [
            {"lr": 0.2, "momentum": 0.5, "dampening": 0.3, "weight_decay": 1e-3, "maximize": True},
            {"lr": torch.tensor(0.05), "momentum": 0.9, "nesterov": True},
        ],
    )
    + _torch_cases(
        "Adam",
        optim_inputs_func_adam,
        [
            {"lr": torch.tensor(3e-3), "betas": (0.8, 0.95), "eps": 1e-6},
            {"lr": 2e-2, "amsgrad": True, "maximize": True, "betas": (torch.tensor(0.85), torch.tensor(0.99))},
        ],
    )
    + _torch_cases(
        "AdamW",
        optim_inputs_func_adamw,
        [{"lr": 5e-3, "weight_decay": 0.3, "amsgrad": True}, {"lr": torch.tensor(1e-2), "weight_decay": 0.05}],
    )
)


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("name,kwargs", CASES)
def test_matches_torch_optim_50_steps(name, kwargs, backend):
    if not sparsetrain.backends.runs_on(backend, torch.device("cpu"))[0]:
        pytest.skip(sparsetrain.backends.runs_on(backend, torch.device("cpu"))[1])
    ours_params = make_params(SHAPES)
    ref_params = clone_params(ours_params)
    ours = getattr(sparsetrain.optim, name)(ours_params, backend=backend, **kwargs)
    ref = getattr(torch.optim, name)(ref_params, **kwargs)
    for step in range(50):
        set_grads([ours_params, ref_params], step, none_every=5)
        ours.step()
        ref.step()
    assert ours.backend == backend
    assert max_rel_err(ours_params, ref_params) <= 1e-6


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_groups_schedulers_zero_grad_add_param_group(name):
    base = make_params(SHAPES, seed=3)
    ref_base = clone_params(base)
    extra, ref_extra = make_params([(9, 4)], seed=4), None
    ref_extra = clone_params(extra)
    kw = {"momentum": 0.9} if name == "SGD" else {"weight_decay": 0.02}

    def groups(params):
        return [{"params": params[:2], "lr": 0.05}, {"params": params[2:], "lr": 0.01, "weight_decay": 0.1}]

    ours = getattr(sparsetrain.optim, name)(groups(base), **kw)
    ref = getattr(torch.optim, name)(groups(ref_base), **kw)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5) for o in (ours, ref)]
    for step in range(40):
        if step == 10:
            ours.add_param_group({"params": extra, "lr": 0.02})
            ref.add_param_group({"params": ref_extra, "lr": 0.02})
        params_now = [base + (extra if step >= 10 else []), ref_base + (ref_extra if step >= 10 else [])]
        set_grads(params_now, step, none_every=3)
        for opt, sched in zip((ours, ref), scheds):
            opt.step()
            sched.step()
            opt.zero_grad()
        assert all(p.grad is None for p in params_now[0])
    assert max_rel_err(base + extra, ref_base + ref_extra) <= 1e-6
    assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"]


def test_closure_is_called_and_returned():
    p = make_params([(4,)])[0]
    opt = sparsetrain.optim.SGD([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    before = p.detach().clone()
    loss = opt.step(closure)
    torch.testing.assert_close(loss, (before**2).sum())
    torch.testing.assert_close(p.detach(), before - 0.1 * 2 * before)
