"""Statistics only when consumed: a step computes them only when its method reads them on that step
or the next (``Method.needs_stats``), and training is bit for bit what it is with statistics on every
step."""

import pytest
import torch
from conftest import triton_usable
from torch import nn

import sparsetrain
from sparsetrain import methods
from sparsetrain.contract import STAT_SUM_ABS_G

STEPS = 22


def _train(backend: str, always: bool, monkeypatch, method_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 33), nn.Tanh(), nn.Linear(33, 3))
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, backend=backend, seed=3)
    method = method_factory()
    pruner = sparsetrain.Pruner(model, opt, method)
    if always:
        monkeypatch.setattr(sparsetrain.Pruner, "wants_stats", lambda self: True)
    data = torch.Generator().manual_seed(1)
    computed = []
    for step in range(STEPS):
        x, y = torch.randn(16, 6, generator=data), torch.randn(16, 3, generator=data)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        # the sum of |g| is written by the fused step only (a mask set at an event rewrites the others)
        before = [float(pruner.stats(t)[STAT_SUM_ABS_G]) for t in pruner.targets]
        opt.step()
        after = [float(pruner.stats(t)[STAT_SUM_ABS_G]) for t in pruner.targets]
        computed.append(all(a != b for a, b in zip(before, after)))
        assert before == after or computed[-1], step  # all tensors of a step, or none
    monkeypatch.undo()
    params = [p.detach().clone() for p in model.parameters()]
    masks = [opt.state[t.param]["mask_words"].clone() for t in pruner.targets]
    return method, computed, params, masks


def _backends():
    usable = triton_usable()[0]
    return ["torch", pytest.param("triton", marks=pytest.mark.skipif(not usable, reason="no triton"))]


@pytest.mark.parametrize("backend", _backends())
def test_stochastic_steps_compute_statistics_only_before_and_at_events(backend, monkeypatch):
    def factory():
        return methods.StochasticMagnitude(0.6, start=6, end=18, interval=5, temperature=0.5, l2=1e-3)

    method, computed, params, masks = _train(backend, False, monkeypatch, factory)
    wanted = [method.needs_stats(k) or method.needs_stats(k + 1) for k in range(STEPS)]
    assert computed == wanted and 0 < sum(wanted) < STEPS  # events at 6, 11, 16: steps 4-6, 9-11, 14-16
    _, always, params_always, masks_always = _train(backend, True, monkeypatch, factory)
    assert all(always)
    for a, b in zip(params, params_always):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(masks, masks_always):
        assert torch.equal(a, b)


def test_a_method_that_reads_no_statistics_computes_none(monkeypatch):
    def factory():
        return methods.Magnitude(0.5, start=3, end=12, interval=3)

    _, computed, params, masks = _train("torch", False, monkeypatch, factory)
    assert not any(computed)
    _, _, params_always, masks_always = _train("torch", True, monkeypatch, factory)
    for a, b in zip(params, params_always):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(masks, masks_always):
        assert torch.equal(a, b)


def test_selective_decay_computes_statistics_every_step(monkeypatch):
    def factory():
        return methods.SelectiveDecay(0.5, sd=1e-2, start=2, end=14, interval=4)

    _, computed, _, _ = _train("torch", False, monkeypatch, factory)
    assert all(computed)
