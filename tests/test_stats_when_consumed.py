"""Statistics only when consumed: a step computes them only when its method reads them on the next
step (``Method.needs_stats``); a stochastic event reads the previous step's without computing its
own (the op's ``write_stats=False``). Training is bit for bit what it is with statistics on every step."""

import pytest
import torch
from conftest import triton_usable
from torch import nn

import sparsetrain
from sparsetrain import backends, contract, masks, methods, ops, philox
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


def _assert_identical(params, mask_list, params_other, masks_other) -> None:
    """Weights and masks of two runs are bit-identical."""
    for a, b in zip(params, params_other, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(mask_list, masks_other, strict=True):
        assert torch.equal(a, b)


def _backends():
    usable = triton_usable()[0]
    return ["torch", pytest.param("triton", marks=pytest.mark.skipif(not usable, reason="no triton"))]


@pytest.mark.parametrize("backend", _backends())
def test_stochastic_steps_compute_statistics_only_before_events(backend, monkeypatch):
    def factory():
        return methods.StochasticMagnitude(0.6, start=6, end=18, interval=5, temperature=0.5, l2=1e-3)

    method, computed, params, mask_list = _train(backend, False, monkeypatch, factory)
    wanted = [method.needs_stats(k + 1) for k in range(STEPS)]
    assert computed == wanted and 0 < sum(wanted) < STEPS  # events at 6, 11, 16: steps 4-5, 9-10, 14-15
    assert not any(computed[k] for k in (6, 11, 16))  # an event reads the statistics, computes none
    _, always, params_always, masks_always = _train(backend, True, monkeypatch, factory)
    assert all(always)
    _assert_identical(params, mask_list, params_always, masks_always)


def test_a_method_that_reads_no_statistics_computes_none(monkeypatch):
    def factory():
        return methods.Magnitude(0.5, start=3, end=12, interval=3)

    _, computed, params, mask_list = _train("torch", False, monkeypatch, factory)
    assert not any(computed)
    _, _, params_always, masks_always = _train("torch", True, monkeypatch, factory)
    _assert_identical(params, mask_list, params_always, masks_always)


def test_selective_decay_computes_statistics_every_step(monkeypatch):
    def factory():
        return methods.SelectiveDecay(0.5, sd=1e-2, start=2, end=14, interval=4)

    _, computed, _, _ = _train("torch", False, monkeypatch, factory)
    assert all(computed)


def _op_backends():
    names = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_usable()[0], reason="no triton"))]
    usable, why = backends.runs_on("native", torch.device("cpu"))
    return names + [pytest.param("native", marks=pytest.mark.skipif(not usable, reason=str(why)))]


@pytest.mark.parametrize("algo", ["sgd", "adam"])
@pytest.mark.parametrize("backend", _op_backends())
def test_an_op_that_writes_no_statistics_reads_them_and_leaves_them(backend, algo):
    # a stochastic event with selective decay (both read the previous statistics): the same weights,
    # states and masks as with write_stats=True, the statistics left exactly as they were
    gen = torch.Generator().manual_seed(5)
    sizes = [1500, 77]
    alive = [torch.rand(n, generator=gen) < 0.8 for n in sizes]
    params = [torch.randn(n, generator=gen) * a for n, a in zip(sizes, alive)]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    states = [[torch.rand(n, generator=gen) * a for n, a in zip(sizes, alive)] for _ in range(3)]
    stats = []
    for p, a in zip(params, alive):
        w = p.double().abs()
        stats.append(torch.tensor([a.sum(), w.sum(), (torch.exp(-w / 0.3) * a).sum(), 0.8 * a.sum(), 0.3]))
    coefs = []
    for n in sizes:
        c = torch.zeros(contract.NUM_COEFS)
        c[contract.COEF_L2], c[contract.COEF_SD], c[contract.COEF_SD_BETA] = 1e-2, 0.5, 1.5
        c[contract.COEF_PRUNE_COUNT], c[contract.COEF_TEMPERATURE] = 0.2 * n, 0.7
        coefs.append(c)
    inputs = dict(params=params, grads=grads, states=states, stats=[s.double() for s in stats], coefs=coefs,
                  words=[masks.pack(a) for a in alive], steps=[torch.tensor(3.0) for _ in sizes])  # fmt: skip
    out = {}
    for write in (True, False):
        x = {k: [[t.clone() for t in v] if isinstance(v, list) else v.clone() for v in vs] for k, vs in inputs.items()}
        common = dict(
            mask_words=x["words"], stats=x["stats"], tensor_coefs=x["coefs"], group_coefs=[], group_inner=[],
            shard_offsets=[], seeds=torch.tensor([philox.event_seed(5, t, 1) for t in range(len(sizes))]),
            found_inf=None, lr=0.05, lr_tensor=None, prune="stochastic", regularize=True, l1_proximal=True,
            backend=backend, write_stats=write,
        )  # fmt: skip
        if algo == "sgd":
            ops.sgd_step_(x["params"], x["grads"], x["states"][0], x["steps"], weight_decay=1e-3, momentum=0.9,
                          dampening=0.0, nesterov=False, maximize=False, **common)  # fmt: skip
        else:
            ops.adam_step_(x["params"], x["grads"], x["states"][0], x["states"][1], [], x["steps"], beta1=0.9,
                           beta2=0.999, eps=1e-8, weight_decay=1e-2, decoupled=True, amsgrad=False, maximize=False,
                           **common)  # fmt: skip
        out[write] = x
    for key in ("params", "words", "steps"):
        for a, b in zip(out[True][key], out[False][key]):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    for states_written, states_read in zip(out[True]["states"], out[False]["states"]):
        for a, b in zip(states_written, states_read):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    for before, written, read in zip(inputs["stats"], out[True]["stats"], out[False]["stats"]):
        assert torch.equal(read, before) and not torch.equal(written, before)
    assert any(not torch.equal(w, b) for w, b in zip(out[True]["words"], inputs["words"]))  # the event pruned
