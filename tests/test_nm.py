"""N:M sparsity: the decision of every backend against the rule of sparsetrain.contract, the method, errors.

The rule: groups of M consecutive elements of the flat tensor (M consecutive weights of a row of the
[out, in*...] view); a live element stays when fewer than N live elements of its group have a larger
|w| after the update, or an equal |w| at a lower index; dead elements stay dead and are not counted.
"""

import copy

import pytest
import torch
from conftest import DEVICE, triton_usable
from test_triton_backend import _call, _compare, _inputs

import sparsetrain
from sparsetrain import backends, contract, masks
from sparsetrain.backends.torch_ref import nm_keep

NATIVE = backends.runs_on("native", DEVICE)
needs_native = pytest.mark.skipif(not NATIVE[0], reason=f"native backend: {NATIVE[1]}")
needs_triton = pytest.mark.skipif(not triton_usable()[0], reason=triton_usable()[1])
FUSED = [pytest.param("native", marks=needs_native), pytest.param("triton", marks=needs_triton)]


def _brute(w: torch.Tensor, alive: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The rule element by element, in Python."""
    keep = torch.zeros_like(alive)
    for g in range(0, w.numel(), m):
        for j in range(g, g + m):
            rank = sum(
                1 for k in range(g, g + m) if alive[k] and (abs(w[k]) > abs(w[j]) or (abs(w[k]) == abs(w[j]) and k < j))
            )
            keep[j] = bool(alive[j]) and rank < n
    return keep


def test_known_answers():
    w = torch.tensor([0.1, -0.5, 0.3, 0.5, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, -2.0, 0.0, 3.0, 1.0, 2.0, 0.5])
    alive = torch.ones(16, dtype=torch.bool)
    alive[12] = False  # a dead element is never counted: 1.0 and 2.0 stay beside it
    expect = [0, 1, 0, 1, 1, 1, 0, 0, 1, 0, 1, 0, 0, 1, 1, 0]
    assert nm_keep(contract.nm_code(2, 4), w, alive).tolist() == [bool(e) for e in expect]
    # a group with fewer than N live elements keeps them all, and nothing comes back
    alive = torch.tensor([True, False, False, False])
    assert nm_keep(contract.nm_code(2, 4), torch.tensor([0.0, 5.0, 5.0, 5.0]), alive).tolist() == [
        True, False, False, False,
    ]  # fmt: skip


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 2), (3, 8), (5, 16), (7, 32)])
def test_reference_matches_the_rule(n, m):
    gen = torch.Generator().manual_seed(n * 100 + m)
    w = torch.randint(-3, 4, (m * 7,), generator=gen).float() * 0.5  # many ties
    alive = torch.rand(m * 7, generator=gen) < 0.8
    keep = nm_keep(contract.nm_code(n, m), w, alive)
    assert torch.equal(keep, _brute(w, alive, n, m))
    assert (keep & alive).view(-1, m).sum(1).le(n).all()


def _nm_inputs(sizes, algo, n, m, seed, dtype=torch.float32):
    inputs = _inputs(sizes, [dtype] * len(sizes), algo=algo, prune="nm", seed=seed)
    for c in inputs["tensor_coefs"]:
        c[contract.COEF_NM] = contract.nm_code(n, m)
    return inputs


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("algo", ["sgd", "adam"])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8), (9, 32)])
def test_backend_matches_reference(backend, algo, n, m):
    # odd row counts: 7 rows of 4*m, 3 rows of m, and one tensor over several blocks of either driver
    sizes = [7 * 4 * m, 3 * m, (1027 if backend == "native" else 67) * m]
    inputs = _nm_inputs(sizes, algo, n, m, seed=n + m)
    ref, out = copy.deepcopy(inputs), copy.deepcopy(inputs)
    _call(ref, "torch", algo=algo, prune="nm")
    _call(out, backend, algo=algo, prune="nm")
    for t, size in enumerate(sizes):
        a, b = masks.unpack(ref["mask_words"][t], size), masks.unpack(out["mask_words"][t], size)
        assert torch.equal(a, b), f"tensor {t}: {(a != b).sum()} mask bits differ"
        before = masks.unpack(inputs["mask_words"][t], size)
        assert not (b & ~before).any()  # nothing revives
        per_group = b.view(-1, m).sum(1)
        assert torch.equal(per_group, before.view(-1, m).sum(1).clamp(max=n))
    _compare(ref, out)


@needs_native
def test_native_matches_reference_bf16():
    inputs = _nm_inputs([64, 24 * 4], "sgd", 2, 4, seed=3, dtype=torch.bfloat16)
    ref, out = copy.deepcopy(inputs), copy.deepcopy(inputs)
    _call(ref, "torch", algo="sgd", prune="nm")
    _call(out, "native", algo="sgd", prune="nm")
    for a, b in zip(ref["mask_words"], out["mask_words"]):
        assert torch.equal(a, b)
    _compare(ref, out)


@pytest.mark.parametrize("backend", ["torch", *FUSED])
def test_bad_pattern_or_size_is_refused_before_anything_changes(backend):
    inputs = _nm_inputs([16, 10], "sgd", 2, 4, seed=1)  # 10 elements: not whole groups of 4
    before = copy.deepcopy(inputs)
    with pytest.raises(RuntimeError, match="multiples of M"):
        _call(inputs, backend, algo="sgd", prune="nm")
    inputs = _nm_inputs([16, 8], "sgd", 2, 4, seed=1)
    inputs["tensor_coefs"][1][contract.COEF_NM] = 0.0  # no pattern set
    before = copy.deepcopy(inputs)
    with pytest.raises((RuntimeError, ValueError), match="N:M pattern"):
        _call(inputs, backend, algo="sgd", prune="nm")
    for a, b in zip(before["params"], inputs["params"]):
        assert torch.equal(a, b)
    for a, b in zip(before["mask_words"], inputs["mask_words"]):
        assert torch.equal(a, b)


def test_pattern_checks():
    with pytest.raises(ValueError, match="M must be one of"):
        contract.nm_code(2, 6)
    with pytest.raises(ValueError, match="1 <= N < M"):
        contract.nm_code(4, 4)
    with pytest.raises(ValueError, match="1 <= N < M"):
        sparsetrain.methods.NM(0, 4)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1, backend="torch")
    with pytest.raises(ValueError, match="row length 6"):
        sparsetrain.Pruner(model, opt, sparsetrain.methods.NM(2, 4))


@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=needs_native)])
def test_method_prunes_linear_and_conv_rows_two_of_four(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(4, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 12), torch.nn.Linear(12, 4)
    )
    reference = copy.deepcopy(model)
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, backend=backend)
    pruner = sparsetrain.Pruner(model, opt, sparsetrain.methods.NM(2, 4, start=1))
    x, y = torch.randn(5, 4, 6, 6), torch.randn(5, 4)
    for step in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        for target in pruner.targets:
            rows = opt.mask(target.param).reshape(target.param.shape[0], -1).view(-1, 4).sum(1)
            assert (rows == (2 if step >= 1 else 4)).all(), (step, target.name)
            assert torch.equal(target.param.detach() != 0, opt.mask(target.param) & (target.param.detach() != 0))
    # the same model and data on the reference backend give the same masks
    if backend != "torch":
        opt_ref = sparsetrain.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, backend="torch")
        pruner_ref = sparsetrain.Pruner(reference, opt_ref, sparsetrain.methods.NM(2, 4, start=1))
        for _ in range(3):
            opt_ref.zero_grad()
            torch.nn.functional.mse_loss(reference(x), y).backward()
            opt_ref.step()
        for a, b in zip(pruner.targets, pruner_ref.targets):
            assert torch.equal(opt.mask(a.param), opt_ref.mask(b.param))
            torch.testing.assert_close(a.param.detach(), b.param.detach(), rtol=1e-5, atol=1e-6)


def test_semi_structured_conversion_checks_before_converting():
    from sparsetrain.nm import is_two_four, to_semi_structured

    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0, 4.0]])
    assert is_two_four(w) and not is_two_four(w + 1) and not is_two_four(torch.ones(2, 6))
    model = torch.nn.Sequential(torch.nn.Linear(8, 1), torch.nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.copy_(w)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        to_semi_structured(model)
    with pytest.raises(RuntimeError, match="compute capability 8.0"):
        to_semi_structured(model.half())
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        to_semi_structured(model, include=["1"])
    with pytest.raises(ValueError, match="not an nn.Linear"):
        to_semi_structured(model, include=["missing"])
    assert model[0].weight.layout == torch.strided  # nothing converted
