"""Property-based checks (hypothesis) over shapes, dtypes and hyperparameters.

* the fused optimizers give torch.optim's results (torch backend, fp32, 0-element tensors included);
* the Triton backend (interpreted on CPU) agrees with the torch reference with masks and pruning;
* a param group either is accepted or is refused with the optimizer left exactly as it was.

Examples are derandomized (the same ones every run) and few, with small tensors, to keep CI time low.
"""

from __future__ import annotations

import pytest
import torch
from conftest import triton_usable
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import sparsetrain

SETTINGS = dict(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
# two units in the last place after two steps: the interpreter's fp32 -> bf16 / fp16 downcast truncates where
# torch rounds to nearest, one unit per step at most (relative: 2 * 2**-7 for bf16 values just above a power of 2)
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2 * 2**-7, 1e-5), torch.float16: (2 * 2**-10, 1e-5)}

dims = st.integers(0, 9)
small_shapes = st.lists(st.one_of(st.tuples(st.integers(0, 60)), st.tuples(dims, dims), st.tuples(dims, dims, dims)),
                        min_size=1, max_size=3)  # fmt: skip


def _values(shapes, seed, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * scale).to(dtype) for s in shapes]


@st.composite
def sgd_hyper(draw):
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    dampening = draw(st.sampled_from([0.0, 0.3])) if momentum else 0.0
    return dict(
        lr=draw(st.floats(0.0, 0.5)),
        momentum=momentum,
        dampening=dampening,
        nesterov=bool(momentum) and dampening == 0 and draw(st.booleans()),
        weight_decay=draw(st.sampled_from([0.0, 1e-3, 0.1])),
        maximize=draw(st.booleans()),
    )


@st.composite
def adam_hyper(draw):
    return dict(
        lr=draw(st.floats(1e-4, 0.1)),
        betas=(draw(st.floats(0.0, 0.95)), draw(st.floats(0.5, 0.9999))),
        eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
        weight_decay=draw(st.sampled_from([0.0, 1e-2, 0.2])),
        amsgrad=draw(st.booleans()),
        maximize=draw(st.booleans()),
    )


algorithm = st.one_of(
    st.tuples(st.just("SGD"), sgd_hyper()), st.tuples(st.sampled_from(["Adam", "AdamW"]), adam_hyper())
)


@settings(max_examples=40, **SETTINGS)
@given(algo=algorithm, shapes=small_shapes, steps=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_matches_torch_optim(algo, shapes, steps, seed):
    name, hyper = algo
    ours = [v.requires_grad_() for v in _values(shapes, seed)]
    ref = [v.detach().clone().requires_grad_() for v in ours]
    opt = getattr(sparsetrain.optim, name)(ours, backend="torch", **hyper)
    ref_opt = getattr(torch.optim, name)(ref, **hyper)
    for step in range(steps):
        for p, q, g in zip(ours, ref, _values(shapes, seed + 1 + step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


prune_modes = st.sampled_from(["none", "low", "high", "group"])


@pytest.mark.skipif(not triton_usable()[0], reason=triton_usable()[1])
@settings(max_examples=6, phases=[Phase.explicit, Phase.generate], **SETTINGS)  # no shrinking: slow interpreted
@given(
    algo=algorithm,
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    sizes=st.lists(st.sampled_from([0, 1, 31, 33, 100, 1023, 1025]), min_size=1, max_size=3),
    mode=prune_modes,
    density=st.floats(0.0, 1.0),
    l2=st.sampled_from([0.0, 1e-2]),
    l1=st.sampled_from([0.0, 1e-3]),
    seed=st.integers(0, 2**16),
)
def test_triton_agrees_with_the_torch_reference(algo, dtype, sizes, mode, density, l2, l1, seed):
    name, hyper = algo
    gen = torch.Generator().manual_seed(seed)
    alive = [torch.rand(n, generator=gen) < density for n in sizes]
    groups = [g if n % g == 0 else 1 for n, g in zip(sizes, (3, 5, 2))]
    flags = [(torch.rand(g, generator=gen) < 0.4).float() for g in groups]
    results = {}
    for backend in ("torch", "triton"):
        params = [v.requires_grad_() for v in _values([(n,) for n in sizes], seed, dtype)]
        opt = getattr(sparsetrain.optim, name)(params, backend=backend, **hyper)
        opt.uses_groups = True
        for p, a, g, f in zip(params, alive, groups, flags):
            opt.enable_pruning(p, groups=g)
            opt.set_mask(p, a)
            opt.set_coefs(p, l2=l2, l1=l1, threshold=0.5)
            opt.state[p]["group_coefs"][1].copy_(f)
        for step in range(2):
            for p, g in zip(params, _values([(n,) for n in sizes], seed + 1 + step, dtype)):
                p.grad = g
            if step == 1:
                opt.schedule_pruning(mode)
            opt.step()
        results[backend] = (params, [opt.mask(p) for p in params], [opt.state[p] for p in params])
    rtol, atol = TOL[dtype]
    (ref_params, ref_masks, ref_states), (params, masks, states) = results["torch"], results["triton"]
    for p, q, m, n, s, r in zip(params, ref_params, masks, ref_masks, states, ref_states):
        near = ((q.detach().float().abs() - 0.5).abs() <= 1e-3) if mode in ("low", "high") else torch.zeros_like(m)
        assert torch.equal(m | near, n | near)  # masks exactly, but for weights at the threshold (rounding)
        keep = ~near
        scale = float(q.detach().float().abs().max()) if q.numel() else 0.0  # ulps of the largest weight
        torch.testing.assert_close(p.detach()[keep], q.detach()[keep], rtol=rtol, atol=max(atol, rtol * scale))
        assert bool(((p.detach() == 0) & ~torch.signbit(p.detach()))[~m].all())  # dead: exactly +0.0
        if not near.any():
            torch.testing.assert_close(s["stats"], r["stats"], rtol=max(rtol, 1e-5), atol=1e-6)
        assert float(s["step"]) == float(r["step"]) == 2


bad_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-1.0, 0.0, 1.0, 1.5, None, "0.1", True])
)


@settings(max_examples=60, **SETTINGS)
@given(
    name=st.sampled_from(["SGD", "Adam"]),
    values=st.dictionaries(
        st.sampled_from(["lr", "momentum", "dampening", "weight_decay", "eps", "nesterov", "beta1", "beta2"]),
        bad_numbers,
        max_size=3,
    ),
)
def test_a_group_is_accepted_whole_or_refused_with_nothing_changed(name, values):
    params = [torch.randn(4, 3, requires_grad=True)]
    opt = getattr(sparsetrain.optim, name)(params, lr=0.1, backend="torch")
    group = {k: v for k, v in values.items() if not k.startswith("beta")}
    if name == "Adam":
        group = {k: v for k, v in group.items() if k in ("lr", "weight_decay", "eps")}
        if "beta1" in values or "beta2" in values:
            group["betas"] = (values.get("beta1", 0.9), values.get("beta2", 0.999))
    else:
        group = {k: v for k, v in group.items() if k != "eps"}
    extra = torch.randn(5, requires_grad=True)

    def snapshot():
        groups = [
            ({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]]) for g in opt.param_groups
        ]
        return groups, [id(p) for p in opt.state]

    before = snapshot()
    try:
        opt.add_param_group({"params": [extra], **group})
    except (ValueError, TypeError) as exc:
        assert "param group 1" in str(exc)
        assert snapshot() == before
        return
    for key, value in group.items():  # accepted: every value is a valid one
        for v in value if isinstance(value, tuple) else (value,):
            if key == "nesterov":
                assert isinstance(v, bool)
            else:
                assert isinstance(v, float) and abs(v) <= 3.4e38 and (v >= 0 or key == "dampening"), (key, value)
    extra.grad = torch.ones(5)
    params[0].grad = torch.ones(4, 3)
    opt.step()
