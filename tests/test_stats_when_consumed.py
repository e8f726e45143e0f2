"""Statistics only when consumed, per statistic: a step computes exactly the statistics its method reads on
the next step (``Method.stats_read``), stores the others as 0, and computes none when that is empty; a
stochastic event reads the previous step's without computing its own (the op's ``write_stats=False`` /
``stats_mask=0``). Training is bit for bit what it is with every statistic on every step."""

import pytest
import torch
from conftest import triton_usable
from torch import nn

import sparsetrain
from sparsetrain import backends, contract, masks, methods, ops, philox
from sparsetrain.contract import (
    STAT_SUM_ABS_G,
    STAT_SUM_ABS_W,
    STAT_SUM_KERNEL,
    STAT_TM,
    STATS_ALIVE,
    STATS_ALL,
    STATS_SUM_ABS_G,
    STATS_SUM_ABS_W,
    STATS_SUM_KERNEL,
)

STEPS = 22


def _train(backend: str, always: bool, monkeypatch, method_factory):
    """Train a small model; returns the method, per step the statistics the fused op computed (its
    ``stats_mask``, 0 when it got none or wrote none), the stats vectors after each step, and the final
    weights and masks. ``always``: every statistic on every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 33), nn.Tanh(), nn.Linear(33, 3))
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, backend=backend, seed=3)
    method = method_factory()
    pruner = sparsetrain.Pruner(model, opt, method)
    if always:
        monkeypatch.setattr(sparsetrain.Pruner, "stats_to_compute", lambda self: STATS_ALL)
    calls = []
    real_call = ops.call

    def recording_call(op, *args, **kwargs):
        if kwargs["stats"]:  # the masked tensors' call
            calls.append(contract.stats_computed(kwargs.get("write_stats", True), kwargs.get("stats_mask", STATS_ALL)))
        real_call(op, *args, **kwargs)

    monkeypatch.setattr(ops, "call", recording_call)
    data = torch.Generator().manual_seed(1)
    computed, vectors = [], []
    for _ in range(STEPS):
        x, y = torch.randn(16, 6, generator=data), torch.randn(16, 3, generator=data)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        calls.clear()
        opt.step()
        assert len(calls) <= 1
        computed.append(calls[0] if calls else 0)
        vectors.append([pruner.stats(t).clone() for t in pruner.targets])
    monkeypatch.undo()
    params = [p.detach().clone() for p in model.parameters()]
    masks = [opt.state[t.param]["mask_words"].clone() for t in pruner.targets]
    return method, computed, vectors, params, masks


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
def test_stochastic_steps_compute_only_the_statistics_of_the_next_event(backend, monkeypatch):
    def factory():
        return methods.StochasticMagnitude(0.6, start=6, end=18, interval=5, temperature=0.5, l2=1e-3)

    method, computed, vectors, params, mask_list = _train(backend, False, monkeypatch, factory)
    wanted = [method.stats_read(k + 1) for k in range(STEPS)]
    assert computed == wanted  # events at 6, 11, 16: |w| two steps before, the kernel sum one step before
    for event in (6, 11, 16):
        assert computed[event - 2] == STATS_ALIVE | STATS_SUM_ABS_W
        assert computed[event - 1] == STATS_ALIVE | STATS_SUM_KERNEL
        assert computed[event] == 0  # an event reads the statistics, computes none
    assert sum(map(bool, computed)) == 6
    for k, step_vectors in enumerate(vectors):  # the |g| sum is never computed: its slot stays 0
        assert all(float(v[STAT_SUM_ABS_G]) == 0.0 for v in step_vectors), k
        if computed[k] == STATS_ALIVE | STATS_SUM_ABS_W:  # no kernel sum: it and its scale are stored as 0
            assert all(float(v[STAT_SUM_KERNEL]) == float(v[STAT_TM]) == 0.0 for v in step_vectors), k
            assert all(float(v[STAT_SUM_ABS_W]) > 0 for v in step_vectors), k
        if computed[k] == STATS_ALIVE | STATS_SUM_KERNEL:
            assert all(float(v[STAT_SUM_ABS_W]) == 0.0 < float(v[STAT_SUM_KERNEL]) for v in step_vectors), k
    _, always, _, params_always, masks_always = _train(backend, True, monkeypatch, factory)
    assert always == [STATS_ALL] * STEPS
    _assert_identical(params, mask_list, params_always, masks_always)


def test_an_event_on_every_step_computes_alive_w_and_kernel_never_g(monkeypatch):
    def factory():
        return methods.StochasticMagnitude(0.6, start=3, end=15, interval=1, temperature=0.5, l1=1e-3)

    _, computed, vectors, params, mask_list = _train("torch", False, monkeypatch, factory)
    event_stats = STATS_ALIVE | STATS_SUM_ABS_W | STATS_SUM_KERNEL
    # events at 3..15: step k computes what step k + 1 reads
    expected = [0, STATS_ALIVE | STATS_SUM_ABS_W] + [event_stats] * 12 + [STATS_ALIVE | STATS_SUM_KERNEL] + [0] * 7
    assert computed == expected
    assert all(float(v[STAT_SUM_ABS_G]) == 0.0 for step_vectors in vectors for v in step_vectors)
    _, _, _, params_always, masks_always = _train("torch", True, monkeypatch, factory)
    _assert_identical(params, mask_list, params_always, masks_always)


def test_a_method_that_reads_no_statistics_computes_none(monkeypatch):
    def factory():
        return methods.Magnitude(0.5, start=3, end=12, interval=3)

    _, computed, _, params, mask_list = _train("torch", False, monkeypatch, factory)
    assert not any(computed)
    _, _, _, params_always, masks_always = _train("torch", True, monkeypatch, factory)
    _assert_identical(params, mask_list, params_always, masks_always)


def test_selective_decay_computes_alive_and_g_every_step_never_w_or_kernel(monkeypatch):
    def factory():
        return methods.SelectiveDecay(0.5, sd=1e-2, start=2, end=14, interval=4)

    _, computed, vectors, params, mask_list = _train("torch", False, monkeypatch, factory)
    assert computed == [STATS_ALIVE | STATS_SUM_ABS_G] * STEPS
    for step_vectors in vectors:
        for v in step_vectors:
            assert float(v[STAT_SUM_ABS_W]) == float(v[STAT_SUM_KERNEL]) == float(v[STAT_TM]) == 0.0
            assert float(v[STAT_SUM_ABS_G]) > 0
    _, _, _, params_always, masks_always = _train("torch", True, monkeypatch, factory)
    _assert_identical(params, mask_list, params_always, masks_always)


def test_stats_read_and_needs_stats_default_to_each_other():
    class Any(methods.Method):
        def needs_stats(self, step):
            return step == 3

    class Which(methods.Method):
        def stats_read(self, step):
            return STATS_SUM_ABS_G if step == 2 else 0

    assert [Any().stats_read(k) for k in range(5)] == [0, 0, 0, STATS_ALL, 0]
    assert [Which().needs_stats(k) for k in range(4)] == [False, False, True, False]
    assert methods.Method().stats_read(0) == 0 and not methods.Method().needs_stats(0)


def _op_backends():
    names = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_usable()[0], reason="no triton"))]
    usable, why = backends.runs_on("native", torch.device("cpu"))
    return names + [pytest.param("native", marks=pytest.mark.skipif(not usable, reason=str(why)))]


def _op_inputs() -> dict:
    """Two masked tensors (odd sizes) with the previous step's statistics, for a stochastic event with
    selective decay (both read the previous statistics)."""
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
    return dict(params=params, grads=grads, states=states, stats=[s.double() for s in stats], coefs=coefs,
                words=[masks.pack(a) for a in alive], steps=[torch.tensor(3.0) for _ in sizes])  # fmt: skip


def _run_op(inputs: dict, backend: str, algo: str, **stats_kwargs) -> dict:
    """One fused step on copies of ``inputs``; returns the copies."""
    x = {k: [[t.clone() for t in v] if isinstance(v, list) else v.clone() for v in vs] for k, vs in inputs.items()}
    common = dict(
        mask_words=x["words"], stats=x["stats"], tensor_coefs=x["coefs"], group_coefs=[], group_inner=[],
        shard_offsets=[], seeds=torch.tensor([philox.event_seed(5, t, 1) for t in range(len(x["params"]))]),
        found_inf=None, lr=0.05, lr_tensor=None, prune="stochastic", regularize=True, l1_proximal=True,
        backend=backend, **stats_kwargs,
    )  # fmt: skip
    if algo == "sgd":
        ops.sgd_step_(x["params"], x["grads"], x["states"][0], x["steps"], weight_decay=1e-3, momentum=0.9,
                      dampening=0.0, nesterov=False, maximize=False, **common)  # fmt: skip
    else:
        ops.adam_step_(x["params"], x["grads"], x["states"][0], x["states"][1], [], x["steps"], beta1=0.9,
                       beta2=0.999, eps=1e-8, weight_decay=1e-2, decoupled=True, amsgrad=False, maximize=False,
                       **common)  # fmt: skip
    return x


def _assert_same_step(a: dict, b: dict) -> None:
    """Weights, states, masks and step counts bit-identical."""
    for key in ("params", "words", "steps"):
        for x, y in zip(a[key], b[key], strict=True):
            torch.testing.assert_close(y, x, rtol=0, atol=0)
    for states_a, states_b in zip(a["states"], b["states"]):
        for x, y in zip(states_a, states_b):
            torch.testing.assert_close(y, x, rtol=0, atol=0)


@pytest.mark.parametrize("algo", ["sgd", "adam"])
@pytest.mark.parametrize("backend", _op_backends())
def test_an_op_that_writes_no_statistics_reads_them_and_leaves_them(backend, algo):
    # the same weights, states and masks as with write_stats=True, the statistics left exactly as they were
    inputs = _op_inputs()
    out = {write: _run_op(inputs, backend, algo, write_stats=write) for write in (True, False)}
    _assert_same_step(out[True], out[False])
    for before, written, read in zip(inputs["stats"], out[True]["stats"], out[False]["stats"]):
        assert torch.equal(read, before) and not torch.equal(written, before)
    assert any(not torch.equal(w, b) for w, b in zip(out[True]["words"], inputs["words"]))  # the event pruned


# single statistics, a stochastic event's (alive, |w|, kernel) and selective decay's (alive, |g|)
STATS_MASKS = [
    STATS_ALIVE, STATS_SUM_ABS_W, STATS_SUM_KERNEL, STATS_SUM_ABS_G, STATS_ALIVE | STATS_SUM_ABS_W | STATS_SUM_KERNEL,
    STATS_ALIVE | STATS_SUM_ABS_G,
]  # fmt: skip


@pytest.mark.parametrize("algo", ["sgd", "adam"])
@pytest.mark.parametrize("backend", _op_backends())
def test_every_backend_computes_exactly_the_requested_statistics(backend, algo):
    # each statistic of stats_mask as the torch reference computes it, every other one 0 (STAT_TM with the
    # kernel sum); the step itself bit-identical whatever is computed
    inputs = _op_inputs()
    reference = _run_op(inputs, "torch", algo)  # every statistic
    everything = _run_op(inputs, backend, algo, stats_mask=STATS_ALL)
    _assert_same_step(everything, _run_op(inputs, backend, algo, write_stats=True))  # a bool alone: all
    for ref, out in zip(reference["stats"], everything["stats"]):
        assert bool((ref > 0).all())  # every statistic (and the scale) nonzero: a 0 below is not a coincidence
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-9)
    for mask in STATS_MASKS:
        out = _run_op(inputs, backend, algo, stats_mask=mask)
        _assert_same_step(everything, out)
        for ref, got in zip(reference["stats"], out["stats"]):
            computed = [bool(mask >> i & 1) for i in range(contract.NUM_STATS - 1)] + [bool(mask & STATS_SUM_KERNEL)]
            expected = torch.where(torch.tensor(computed), ref, torch.zeros_like(ref))
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9, msg=lambda m, mask=mask: f"{mask}: {m}")
            assert all(float(got[i]) == 0.0 for i in range(contract.NUM_STATS) if not computed[i]), (mask, got)
    none = _run_op(inputs, backend, algo, write_stats=False, stats_mask=STATS_ALL)
    _assert_same_step(everything, none)
    assert all(torch.equal(a, b) for a, b in zip(none["stats"], inputs["stats"]))


@pytest.mark.parametrize("bad", [16, -1, 2.0, True])
def test_a_bad_stats_mask_is_refused_before_anything_changes(bad):
    inputs = _op_inputs()
    kept = {k: [[t.clone() for t in v] if isinstance(v, list) else v.clone() for v in vs] for k, vs in inputs.items()}
    common = dict(
        mask_words=inputs["words"], stats=inputs["stats"], tensor_coefs=inputs["coefs"], group_coefs=[],
        group_inner=[], shard_offsets=[], seeds=torch.zeros(0, dtype=torch.int64), found_inf=None, lr=0.05,
        lr_tensor=None, prune="none", regularize=True, l1_proximal=True, backend="torch", stats_mask=bad,
    )  # fmt: skip
    with pytest.raises(ValueError, match="stats_mask"):
        ops.call(ops.sgd_step_, inputs["params"], inputs["grads"], inputs["states"][0], inputs["steps"],
                 weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, maximize=False, **common)  # fmt: skip
    for key, values in kept.items():
        for a, b in zip(values, inputs[key]):
            for x, y in zip(a, b) if isinstance(a, list) else [(a, b)]:
                assert torch.equal(x, y), key
