"""The step's list scans (sparsetrain.scan: C++ in sparsetrain._C, Python fallbacks) and the fast path
they open: what changes between steps, after the calls and the launch plan are cached, is still seen."""

from __future__ import annotations

from array import array
from types import SimpleNamespace

import pytest
import torch
from conftest import triton_usable
from helpers import make_params, set_grads
from test_hostile_input import Snapshot

import sparsetrain
from sparsetrain import backends, contract, scan
from sparsetrain.methods import StochasticMagnitude

NATIVE_SCANS = scan.native() is not None


@pytest.fixture(params=["python", pytest.param("native", marks=pytest.mark.skipif(not NATIVE_SCANS, reason="no _C"))])
def impl(request, monkeypatch):
    """Run a test with the extension's scans and with the Python fallbacks."""
    if request.param == "python":
        monkeypatch.setattr(scan, "native", lambda: None)
    return request.param


def _backends():
    out = ["torch"]
    for name in ("triton", "native"):
        usable = backends.runs_on(name, torch.device("cpu"))[0] if name == "native" else triton_usable()[0]
        out.append(pytest.param(name, marks=pytest.mark.skipif(not usable, reason=f"{name} backend unusable")))
    return out


class Sub(torch.Tensor):
    """A tensor subclass: scans read it through Python attributes."""


def _mixed() -> list[torch.Tensor]:
    ps = make_params([(4, 3), (5,), (2, 3, 2), (6,)], seed=3)
    sub = torch.Tensor._make_subclass(Sub, torch.randn(3), True)
    transposed = torch.randn(3, 4).t().requires_grad_()
    ps[0].grad = torch.randn(4, 3)
    ps[2].grad = torch.randn(2, 3, 2)
    sub.grad = torch.randn(3)
    transposed.grad = torch.randn(4, 3)
    return [*ps, sub, transposed]


def test_scans_read_what_python_reads(impl):
    tensors = _mixed()
    lists = [tensors[:2], tuple(tensors[2:5]), [], tensors[5:]]
    with torch.no_grad():
        tensors[1].add_(1)  # a version counter that is not 0
    grads, presence, ids, plain = scan.grads(lists)
    assert len(grads) == len(tensors) and all(g is t.grad for g, t in zip(grads, tensors))
    assert presence == bytes(t.grad is not None for t in tensors)
    assert ids == array("Q", map(id, tensors)).tobytes()
    assert plain is False  # a subclass and a transposed parameter are among them
    versions = scan.decode(scan.versions(tensors))
    assert versions == [t._version for t in tensors] and versions[1] == 1
    assert scan.decode(scan.data_ptrs(tuple(tensors)), signed=False) == [t.data_ptr() for t in tensors]
    assert scan.data_ptrs(tensors) == array("Q", [t.data_ptr() for t in tensors]).tobytes()
    assert scan.all_contiguous(tensors[:5]) is True and scan.all_contiguous(tensors) is False
    with pytest.raises(AttributeError):
        scan.versions([tensors[0], 3])


def _plain_case(case: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    p = torch.randn(4, 6, requires_grad=True)
    g = torch.randn(4, 6)
    if case == "grad_dtype":
        p.grad_dtype = None  # lets the parameter hold a gradient of another dtype
        g = g.half()
    elif case == "transposed_grad":
        g = torch.randn(6, 4).t()
    elif case == "channels_last":
        p = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last).requires_grad_()
        g = torch.randn(2, 3, 4, 4)
    elif case == "sparse_grad":
        g = g.to_sparse()
    elif case == "fp64":
        p, g = p.detach().double().requires_grad_(), g.double()
    elif case == "subclass_grad":
        g = torch.Tensor._make_subclass(Sub, g)
    elif case == "none":
        g = None
    elif case == "bf16":
        p, g = p.detach().bfloat16().requires_grad_(), g.bfloat16()
    return p, g


@pytest.mark.skipif(not NATIVE_SCANS, reason="sparsetrain._C without the scans")
@pytest.mark.parametrize(
    "case, plain",
    [("same", True), ("bf16", True), ("none", True), ("grad_dtype", False), ("transposed_grad", False),
     ("channels_last", False), ("sparse_grad", False), ("fp64", False), ("subclass_grad", False)],
)  # fmt: skip
def test_plain_only_when_every_check_passes(case, plain):
    p, g = _plain_case(case)
    p.grad = g
    other = torch.randn(3, requires_grad=True)
    other.grad = torch.randn(3)
    grads, presence, _, found = scan.grads([[other, p]])
    assert grads[1] is p.grad and presence == bytes([1, g is not None])
    assert found is plain


@pytest.mark.skipif(not NATIVE_SCANS, reason="sparsetrain._C without the scans")
def test_a_torch_function_mode_reads_through_python():
    seen = []

    class Mode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    p = torch.randn(3, requires_grad=True)
    p.grad = torch.randn(3)
    with Mode():
        grads, _, _, plain = scan.grads([[p]])
    assert grads[0] is p.grad and plain is False and seen  # the mode saw the reads


# ------------------------------------------------------------- changes after the plan is cached
def _stepped(backend, pruning=True):
    params = make_params([(7, 5), (33,), (2, 3, 3), (6,)], seed=5)
    opt = sparsetrain.optim.SGD(params, lr=0.1, momentum=0.9, backend=backend)
    if pruning:
        for p in params[:3]:
            opt.enable_pruning(p)
            opt.set_coefs(p, l2=1e-3)
    for step in range(3):  # the calls and the backend's plan are cached now
        set_grads([params], step)
        opt.step()
    return opt, params


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", ["fp16_grad", "sparse_grad", "resized_grad"])
def test_a_bad_gradient_after_cached_steps_is_refused_before_any_update(impl, backend, case):
    opt, params = _stepped(backend)
    set_grads([params], 9)
    dense = params[1].grad
    if case == "fp16_grad":
        params[2].grad.data = params[2].grad.data.half()
        match = r"parameter 2 of param group 0 \(shape \(2, 3, 3\), dtype torch.float32.*has a gradient of"
    elif case == "resized_grad":
        params[3].grad.data = torch.zeros(2, 3)
        match = r"parameter 3 of param group 0 \(shape \(6,\).*has a gradient of shape \(2, 3\)"
    snap = Snapshot(opt)
    if case == "sparse_grad":
        params[1].grad = dense.to_sparse()
        match = r"parameter 1 of param group 0 \(shape \(33,\).*has a sparse gradient"
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    params[1].grad = dense  # (the snapshot compares dense gradients)
    snap.unchanged()


@pytest.mark.parametrize("backend", _backends())
def test_non_contiguous_gradients_after_cached_steps_step_as_contiguous_ones(impl, backend):
    opt, params = _stepped(backend)
    twin, twin_params = _stepped(backend)
    set_grads([params, twin_params], 11)
    params[0].grad = params[0].grad.t().contiguous().t()  # same values, transposed strides
    params[2].grad = params[2].grad.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert not params[0].grad.is_contiguous() and not params[2].grad.is_contiguous()
    opt.schedule_pruning("stochastic")
    twin.schedule_pruning("stochastic")
    opt.step()
    twin.step()
    for p, q in zip(params, twin_params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        torch.testing.assert_close(opt.mask(p), twin.mask(q), rtol=0, atol=0)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", ["replaced", "appended"])
def test_a_parameter_replaced_or_added_in_a_group_list_is_stepped(impl, backend, case):
    params = make_params([(7, 5), (33,), (6,)], seed=8)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    opt = sparsetrain.optim.SGD(params, lr=0.1, momentum=0.9, backend=backend)
    ref = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9)
    for step in range(2):
        set_grads([params, ref_params], step)
        opt.step()
        ref.step()
    new = make_params([(4, 3)], seed=9)[0]
    for optimizer, tensor in ((opt, new), (ref, new.detach().clone().requires_grad_())):
        group = optimizer.param_groups[0]["params"]
        if case == "replaced":
            group[1] = tensor
        else:
            group.append(tensor)
    now = opt.param_groups[0]["params"]
    ref_now = ref.param_groups[0]["params"]
    for step in range(2, 4):
        set_grads([now, ref_now], step)
        opt.step()
        ref.step()
    for p, q in zip(now, ref_now):
        torch.testing.assert_close(p, q)
    assert not torch.equal(new, make_params([(4, 3)], seed=9)[0])  # the new tensor was stepped


@pytest.mark.parametrize("base_seed", [0, 3, 2**63 - 1, 2**64 - 1])
def test_event_seeds_equal_the_scalar_ones(impl, base_seed):
    indices = [0, 1, 5, 160, 2**20 + 3, 2**31 - 1]
    for event in (0, 7, 2**32 - 1, 2**40 + 9):
        seeds = sparsetrain.philox.event_seeds(base_seed, indices, event)
        assert seeds.dtype == torch.int64 and seeds.device.type == "cpu"
        assert seeds.tolist() == [sparsetrain.philox.event_seed(base_seed, t, event) for t in indices]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("source", ["matching", "other_dtype", "strided"])
def test_copy_elements_copies_each_element_and_bumps_versions(impl, dtype, source):
    holders = [torch.zeros(5, dtype=dtype) for _ in range(4)]
    dst = [h[i] for i, h in enumerate(holders)]
    src = torch.randn(8, dtype=torch.float64)[::2] if source == "strided" else torch.randn(4, dtype=dtype)
    if source == "other_dtype":
        src = src.half()
    before = [t._version for t in dst]
    scan.copy_elements(dst, src, list(src.unbind()))
    for i, h in enumerate(holders):
        expected = torch.zeros(5, dtype=dtype)
        expected[i] = src[i].to(dtype)
        torch.testing.assert_close(h, expected, rtol=0, atol=0)
    assert [t._version for t in dst] == [v + 1 for v in before]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("source", ["matching", "other_dtype", "subclass"])
def test_gather_elements_loads_each_element_or_writes_nothing(impl, dtype, source):
    holders = [torch.randn(5, dtype=dtype) for _ in range(4)]
    src = [h[i] for i, h in enumerate(holders)]
    if source == "other_dtype":
        src[2] = src[2].half()
    elif source == "subclass":
        src[1] = torch.Tensor._make_subclass(Sub, src[1].clone())
    dst = torch.full((4,), 7.0, dtype=dtype)
    before = dst._version
    gathered = scan.gather_elements(dst, src)
    assert gathered == (impl == "native" and source == "matching")
    if gathered:
        torch.testing.assert_close(dst, torch.stack(src), rtol=0, atol=0)
        assert dst._version > before
    else:
        torch.testing.assert_close(dst, torch.full((4,), 7.0, dtype=dtype), rtol=0, atol=0)


def test_items_are_and_attrs_equal_compare_item_by_item(impl):
    values = [torch.zeros(2), torch.ones(3), torch.zeros(1)]
    mappings = [{"stats": v, "other": 1} for v in values]
    assert scan.items_are(mappings, "stats", list(values))
    assert not scan.items_are(mappings, "stats", values[:2])  # lengths differ
    assert not scan.items_are(mappings, "stats", [values[0], values[1].clone(), values[2]])  # equal, not the same
    assert not scan.items_are(mappings, "other", list(values))
    with pytest.raises(KeyError):
        scan.items_are([*mappings, {}], "stats", [*values, values[0]])
    objects = [SimpleNamespace(ratio=r) for r in (0.5, 0.25, 0.8)]
    assert scan.attrs_equal(objects, "ratio", [0.5, 0.25, 0.8])
    assert not scan.attrs_equal(objects, "ratio", [0.5, 0.25])
    assert not scan.attrs_equal(objects, "ratio", [0.5, 0.25, 0.75])
    with pytest.raises(AttributeError):
        scan.attrs_equal([*objects, SimpleNamespace()], "ratio", [0.5, 0.25, 0.8, 0.1])


# ------------------------------------------------- StochasticMagnitude's cached calibration views
def test_stochastic_calibration_follows_replaced_state_and_changed_ratios(impl):
    params = make_params([(7, 5), (33,), (2, 3, 3)], seed=2)
    opt = sparsetrain.optim.SGD(params, lr=0.1, backend="torch")
    for p, alive in zip(params, (30, 20, 10)):
        opt.enable_pruning(p)
        opt.state[p]["stats"][contract.STAT_ALIVE] = alive
    method = StochasticMagnitude(0.8, start=1, end=10, interval=1)
    targets = [SimpleNamespace(param=p, ratio=r) for p, r in zip(params, (0.5, 0.8, 0.3))]
    pruner = SimpleNamespace(targets=targets, optimizer=opt, stats=lambda t: opt.state[t.param]["stats"])

    def check(step):
        method.before_step(pruner, step)
        level = method.level(step)
        for target in targets:
            n, state = target.param.numel(), opt.state[target.param]
            alive = float(state["stats"][contract.STAT_ALIVE])
            expected = torch.tensor(max(alive - (n - level * target.ratio * n), 0.0), dtype=torch.float32)
            torch.testing.assert_close(state["coefs"][contract.COEF_PRUNE_COUNT], expected, rtol=0, atol=0)

    check(4)
    saved = opt.state_dict()
    for index, alive in enumerate((25, 15, 5)):
        saved["state"][index]["stats"][contract.STAT_ALIVE] = alive
    opt.load_state_dict(saved)  # new statistics and coefficient tensors
    check(5)
    targets[1].ratio = 0.6
    check(6)
    targets.append(targets.pop(0))  # the same targets in another order
    check(7)
    replaced = params[2]
    opt.state[replaced]["stats"] = opt.state[replaced]["stats"].clone()  # by hand, no state_version bump
    opt.state[replaced]["stats"][contract.STAT_ALIVE] = 4
    check(8)
    opt.state[replaced]["coefs"] = opt.state[replaced]["coefs"].clone()
    check(9)
    targets[0] = SimpleNamespace(param=targets[0].param, ratio=0.7)  # another object in the same place
    check(10)
    for target in targets:  # one ratio for all (its product with the level taken on the host)
        target.ratio = 0.35
    check(10)
