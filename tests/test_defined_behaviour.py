"""One behaviour on every backend at the edges (dead weights, non-finite pruned weights, 0-element
tensors), and nothing that grows per step or outlives its optimizer."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import triton_usable
from helpers import make_params, set_grads
from torch import nn

import sparsetrain
from sparsetrain import contract
from sparsetrain.methods import Magnitude
from sparsetrain.metrics import HISTORY_LIMIT, History

TRITON = pytest.mark.skipif(not triton_usable()[0], reason="needs the Triton backend")
BACKENDS = ["torch", pytest.param("triton", marks=TRITON)]


def _plus_zero(x: torch.Tensor) -> bool:
    """Every element is exactly +0.0 (not -0.0, not NaN)."""
    return bool(((x == 0) & ~torch.signbit(x)).all())


def _masked_sgd(backend, shapes=((37, 3), (70,)), seed=0):
    params = make_params(shapes, seed=seed)
    opt = sparsetrain.optim.SGD(params, lr=0.05, momentum=0.9, backend=backend)
    gen = torch.Generator().manual_seed(seed + 1)
    for p in params:
        opt.set_mask(p, torch.rand(p.shape, generator=gen) > 0.4)
    return opt, params


@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_weights_written_from_outside_are_plus_zero_after_the_next_step(backend):
    results = {}
    for name in ("torch", backend):
        opt, params = _masked_sgd(name)
        for step in range(2):
            set_grads([params], step)
            opt.step()
        dense = make_params([p.shape for p in params], seed=9)  # a dense checkpoint loaded into the model
        with torch.no_grad():
            for p, d in zip(params, dense):
                p.copy_(d)
        set_grads([params], 5)
        opt.step()
        for p in params:
            assert _plus_zero(p.detach()[~opt.mask(p)])
            assert _plus_zero(opt.state[p]["momentum_buffer"][~opt.mask(p)])
        results[name] = [p.detach().clone() for p in params]
    for a, b in zip(results["torch"], results[backend]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_finite_weight_pruned_becomes_plus_zero(backend):
    params = make_params([(40,), (9, 4)], seed=3)
    opt = sparsetrain.optim.SGD(params, lr=0.1, backend=backend)
    for p in params:
        opt.enable_pruning(p)
        opt.set_coefs(p, threshold=50.0)
    with torch.no_grad():
        params[0][[1, 7]] = float("inf")
        params[0][3] = -float("inf")
        params[1][2, 1] = -float("inf")
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.schedule_pruning("high")  # |w| > 50 is pruned: exactly the infinite weights
    opt.step()
    assert opt.mask(params[0]).sum() == 37 and opt.mask(params[1]).sum() == 35
    for p in params:
        assert _plus_zero(p.detach()[~opt.mask(p)])
        assert torch.isfinite(p).all()
    with torch.no_grad():
        params[1][0, 0] = float("inf")
    alive = opt.mask(params[1])
    alive[0, 0] = False
    opt.set_mask(params[1], alive)  # set_mask on an infinite weight: +0.0 too
    assert _plus_zero(params[1].detach()[0, 0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_zero_element_tensors_step_with_zero_statistics(backend, name):
    shapes = [(0,), (33, 2), (4, 0, 3)]
    params = make_params(shapes, seed=4)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    kw = {"lr": 0.05, "momentum": 0.9} if name == "SGD" else {"lr": 1e-2}
    opt = getattr(sparsetrain.optim, name)(params, backend=backend, skip_nonfinite=True, **kw)
    ref = getattr(torch.optim, name)(ref_params, **kw)
    for p in params:
        opt.enable_pruning(p)
    for step in range(3):
        set_grads([params, ref_params], step)
        opt.step()
        ref.step()
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    for p in (params[0], params[2]):
        assert torch.equal(opt.state[p]["stats"], torch.zeros(contract.NUM_STATS, dtype=torch.float64))
        assert float(opt.state[p]["step"]) == 3


@TRITON
def test_triton_statistics_of_a_zero_element_tensor_read_no_partial_row():
    from sparsetrain.backends import triton_backend

    params = make_params([(0,), (40, 3), (0, 2)], seed=8)
    opt = sparsetrain.optim.SGD(params, lr=0.05, backend="triton")
    for p in params:
        opt.enable_pruning(p)
    set_grads([params], 0)
    opt.step()
    for plan in triton_backend._plans.values():
        plan.partials.fill_(float("nan"))  # what uninitialized device memory may hold
    set_grads([params], 1)
    opt.step()
    for p in (params[0], params[2]):
        assert torch.equal(opt.state[p]["stats"], torch.zeros(contract.NUM_STATS, dtype=torch.float64))
    assert torch.isfinite(opt.state[params[1]]["stats"]).all()
    empty = make_params([(0,), (0, 3)], seed=8)  # a call whose tensors are all empty launches no step program
    only = sparsetrain.optim.Adam(empty, lr=0.05, backend="triton")
    set_grads([empty], 0)
    only.step()
    assert [float(only.state[p]["step"]) for p in empty] == [1.0, 1.0]


# ------------------------------------------------------------------------------------- memory
@TRITON
def test_a_deleted_optimizer_leaves_nothing_alive_in_the_triton_cache():
    from sparsetrain.backends import triton_backend

    gc.collect()  # plans of earlier tests' optimizers that are already unreachable go now, not in the middle
    before = len(triton_backend._plans)
    params = make_params([(50, 3), (20,)], seed=5)
    opt = sparsetrain.optim.SGD(params, lr=0.1, momentum=0.9, backend="triton")
    opt.enable_pruning(params[0])
    for step in range(2):
        set_grads([params], step)
        opt.step()
    assert len(triton_backend._plans) == before + 2  # one plan per call: masked and unmasked tensors
    alive = [weakref.ref(opt.state[p][k]) for p in params for k in ("momentum_buffer", "step")]
    alive += [weakref.ref(opt.state[params[0]]["mask_words"]), weakref.ref(params[1].grad), weakref.ref(opt)]
    del opt
    for p in params:
        p.grad = None
    gc.collect()
    assert all(ref() is None for ref in alive)
    assert len(triton_backend._plans) == before


@TRITON
def test_beta_cycling_does_not_grow_a_cache():
    from sparsetrain.backends import triton_backend

    params = make_params([(30, 2)], seed=6)
    opt = sparsetrain.optim.Adam(params, lr=1e-3, backend="triton")
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=40, cycle_momentum=True)
    betas = set()
    for step in range(30):
        set_grads([params], step)
        opt.step()
        schedule.step()
        betas.add(opt.param_groups[0]["betas"])
    assert len(betas) >= 25  # beta1 changed nearly every step
    assert len(triton_backend._log_betas) <= triton_backend._LOG_BETAS_SIZE


def test_pruner_history_is_bounded_and_keeps_an_even_grid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.05, backend="torch")
    pruner = sparsetrain.Pruner(model, opt, Magnitude(0.5), record_every=1)
    assert pruner.history.limit == HISTORY_LIMIT
    pruner.history = History(pruner.targets, every=1, limit=8)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    sizes = []
    for _ in range(70):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        sizes.append(len(pruner.state_dict()["history"]["records"]))
    steps = pruner.history.steps
    assert max(sizes) < 8 and len(steps) >= 4
    assert pruner.history.every == 16
    assert steps == list(range(16, 71, 16))  # every 16th step of the run, from its start
    table = pruner.history.as_dict()
    assert len(table["step"]) == len(table["layers"]["0.weight"]["weight_sparsity"]) == len(steps)


def test_pruner_state_that_does_not_fit_is_refused_before_anything_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.05, backend="torch")
    pruner = sparsetrain.Pruner(model, opt, Magnitude(0.5), record_every=1)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    state = pruner.state_dict()
    bad = {**state, "history": {**state["history"], "records": state["history"]["records"][:-1]}}
    before = (pruner.step_count, list(pruner.history.steps), pruner.method.state_dict())
    with pytest.raises(ValueError, match="history state: 3 steps, 2 records"):
        pruner.load_state_dict({**bad, "step_count": 99})
    assert (pruner.step_count, list(pruner.history.steps), pruner.method.state_dict()) == before
