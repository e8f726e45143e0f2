"""With no pruning configured, sparsetrain's optimizers give torch.optim's results."""

import pytest
import torch
from conftest import DEVICE
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


def _case_lr(case):
    return case.values[1].get("lr")


@pytest.mark.parametrize("name,kwargs", [c for c in CASES if isinstance(_case_lr(c), torch.Tensor)])
def test_triton_tensor_learning_rate_matches_torch_optim(name, kwargs):
    # interpreted on a CPU (TRITON_INTERPRET=1), compiled on a GPU; fp32 math in both
    if not sparsetrain.backends.runs_on("triton", DEVICE)[0]:
        pytest.skip(sparsetrain.backends.runs_on("triton", DEVICE)[1])
    kwargs = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    ours_params = make_params(SHAPES, device=DEVICE)
    ref_params = clone_params(ours_params)
    ours = getattr(sparsetrain.optim, name)(ours_params, backend="triton", **kwargs)
    ref = getattr(torch.optim, name)(ref_params, **kwargs)
    for step in range(50):
        set_grads([ours_params, ref_params], step, none_every=5)
        ours.step()
        ref.step()
    assert max_rel_err(ours_params, ref_params) <= 1e-6


HALF_CASES = [
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-3}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("Adam", {"lr": 1e-2, "weight_decay": 1e-3}),
    ("AdamW", {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}),
]


def _half_backends():
    cpu = torch.device("cpu")
    return [b for b in ("torch", "native") if sparsetrain.backends.runs_on(b, cpu)[0]]


@pytest.mark.parametrize("backend", _half_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,kwargs", HALF_CASES)
def test_16bit_parameters_keep_states_in_their_dtype_like_torch_optim(name, kwargs, dtype, backend):
    """States follow the parameter's dtype (torch.optim's default), and each step agrees with torch.optim's.

    torch.optim rounds every intermediate to the 16-bit dtype; sparsetrain computes in float32 and rounds
    each stored value once. So, from the same weights and states, one step differs by at most one rounding
    of the weight plus a few roundings of the update (4 eps * |update|), and states by a few roundings. The
    runs are resynchronized before every step so that the bound holds per step over 20 steps.
    float16's range is narrow: torch.optim's second moments (1 - beta2) * g**2 fall into subnormals, where
    float16 keeps few digits and torch.optim's intermediates lose more; elements whose second moment is
    below float16's smallest normal are left out of the comparison (at most half of them).
    """
    eps = torch.finfo(dtype).eps
    ours_params = make_params(SHAPES, seed=5, dtype=dtype)
    ref_params = clone_params(ours_params)
    ours = getattr(sparsetrain.optim, name)(ours_params, backend=backend, **kwargs)
    ref = getattr(torch.optim, name)(ref_params, foreach=False, **kwargs)
    for step in range(20):
        set_grads([ours_params, ref_params], step)
        before = [p.detach().clone() for p in ref_params]
        ours.step()
        ref.step()
        for index, (a, b, w0) in enumerate(zip(ours_params, ref_params, before)):
            normal = torch.ones_like(b, dtype=torch.bool)
            if "exp_avg_sq" in ref.state[b]:
                normal = ref.state[b]["exp_avg_sq"] >= torch.finfo(dtype).tiny
                assert normal.float().mean() >= 0.5
            update = float((b.detach().float() - w0.float()).abs().max())
            torch.testing.assert_close(
                a.detach().float()[normal], b.detach().float()[normal], rtol=eps, atol=4 * eps * update + 1e-30,
                msg=lambda m, i=index, s=step: f"step {s}, parameter {i}: {m}",
            )  # fmt: skip
            for key, value in ref.state[b].items():
                if key == "step":
                    continue
                mine = ours.state[a][key]
                assert mine.dtype == value.dtype == dtype, (key, mine.dtype, value.dtype)
                scale = float(value.float().abs().max())
                torch.testing.assert_close(
                    mine.float()[normal], value.float()[normal], rtol=4 * eps, atol=1e-30 + 4 * eps * scale
                )
        with torch.no_grad():  # resynchronize: the next step starts from torch.optim's weights and states
            for a, b in zip(ours_params, ref_params):
                a.copy_(b)
                for key, value in ref.state[b].items():
                    if key != "step":
                        ours.state[a][key].copy_(value)


@pytest.mark.parametrize("name,kwargs", HALF_CASES[1:3])
def test_float32_states_for_16bit_parameters(name, kwargs):
    """state_dtype=torch.float32: float32 buffers, the step as the torch backend computes it, checkpoints too."""
    params = make_params(SHAPES, seed=6, dtype=torch.bfloat16)
    opt = getattr(sparsetrain.optim, name)(params, state_dtype=torch.float32, **kwargs)
    wide = clone_params(params)
    narrow = getattr(sparsetrain.optim, name)(wide, **kwargs)
    for step in range(5):
        set_grads([params, wide], step)
        opt.step()
        narrow.step()
    buffers = [v for st in opt.state.values() for k, v in st.items() if k != "step"]
    assert buffers and all(v.dtype == torch.float32 for v in buffers)
    assert all(v.dtype == torch.bfloat16 for st in narrow.state.values() for k, v in st.items() if k != "step")
    # a checkpoint of 16-bit states loads into float32 states (and back) for the same parameters
    opt.load_state_dict(narrow.state_dict())
    assert all(v.dtype == torch.float32 for st in opt.state.values() for k, v in st.items() if k != "step")
    narrow.load_state_dict(opt.state_dict())
    assert all(v.dtype == torch.bfloat16 for st in narrow.state.values() for k, v in st.items() if k != "step")


@pytest.mark.parametrize("bad", [torch.bfloat16, torch.float64, "float32", 32])
def test_state_dtype_refuses_what_no_backend_stores(bad):
    with pytest.raises(ValueError, match="state_dtype must be None"):
        sparsetrain.optim.SGD(make_params([(3,)]), lr=0.1, momentum=0.9, state_dtype=bad)
