"""The native backend (csrc/, CPU driver here; CUDA driver on a GPU) computes the torch reference's function.

The cases are the Triton backend's agreement suite (same inputs, same comparisons: fp32 relative
error at most 1e-6, bf16 / fp16 two units in the last place, masks exact outside the tie band),
run against backend="native", plus what is particular to the C++ drivers: results independent of
the thread count, tensors split over many chunks, dead words left untouched, and bad input refused
before anything is modified.
"""

import copy
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE
from helpers import clone_params, make_params, max_rel_err, set_grads
from test_triton_backend import BLOCK, SIZES, _call, _compare, _inputs, _mask_disagreements, _set_alive
from test_triton_backend import _run_both as _agree

import sparsetrain
from sparsetrain import backends, contract, masks, philox

pytestmark = pytest.mark.skipif(
    not backends.runs_on("native", DEVICE)[0], reason=f"native backend: {backends.runs_on('native', DEVICE)[1]}"
)

# the NaN cases run on both compiled backends (Triton interpreted on CPU)
_TRITON_RUNS, _TRITON_WHY_NOT = backends.runs_on("triton", DEVICE)
NEEDS_TRITON = pytest.mark.skipif(not _TRITON_RUNS, reason=_TRITON_WHY_NOT)
NATIVE_AND_TRITON = ["native", pytest.param("triton", marks=NEEDS_TRITON)]

CHUNK = 2048 * 32  # elements per chunk of the CPU driver (csrc/cpu_driver.cpp)


def _run_both(sizes, dtypes, algo, prune, seed=0, **kw):
    return _agree(sizes, dtypes, algo, prune, seed, backend="native", **kw)


@pytest.mark.parametrize("prune", [m for m in contract.PRUNE_MODES if m != "nm"])  # N:M: tests/test_nm.py
@pytest.mark.parametrize("algo", ["sgd", "adam"])
def test_all_prune_modes_fp32(algo, prune):
    inputs, ref, out = _run_both(SIZES, [torch.float32] * len(SIZES), algo, prune, seed=len(algo) * 10 + len(prune))
    newly_pruned = sum(
        masks.alive_count(a) - masks.alive_count(b) for a, b in zip(inputs["mask_words"], out["mask_words"])
    )
    assert (newly_pruned > 0) == (prune != "none")


@pytest.mark.parametrize(
    "variant",
    [
        dict(algo="sgd", momentum=0.0),
        dict(algo="sgd", maximize=True, l1_proximal=False),
        dict(algo="adam", decoupled=False, maximize=True),
        dict(algo="sgd", regularize=False),
        dict(algo="adam", lr_tensor=torch.tensor(0.02, device=DEVICE)),
        dict(algo="sgd", lr_tensor=torch.tensor(0.03, device=DEVICE)),
    ],
)
def test_optimizer_variants(variant):
    variant = dict(variant)
    _run_both([33, BLOCK + 1], [torch.float32] * 2, variant.pop("algo"), "low", seed=5, **variant)


@pytest.mark.parametrize("state_dtype", [torch.float32, None], ids=["fp32-states", "param-dtype-states"])
@pytest.mark.parametrize("algo", ["sgd", "adam"])
def test_mixed_dtypes_in_one_call(algo, state_dtype):
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.bfloat16, torch.float32]
    _, _, out = _run_both([31, 1000, 2049, 1, 97], dtypes, algo, "stochastic", seed=11, state_dtype=state_dtype)
    assert [s.dtype for s in out["state_lists"][0]] == [state_dtype or d for d in dtypes]


def test_offsets_above_2_pow_32_and_not_multiples_of_4():
    offsets = [2**32 + 7, 2**33 - 5, 3 * 2**32 + 2]
    out = _run_both([100, 1500, 33], [torch.float32] * 3, "sgd", "stochastic", seed=3, shard_offsets=offsets)[2]
    plain_out = _run_both([100, 1500, 33], [torch.float32] * 3, "sgd", "stochastic", seed=3)[2]
    assert not all(torch.equal(a, b) for a, b in zip(out["mask_words"], plain_out["mask_words"]))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's NaN
@pytest.mark.parametrize("backend", NATIVE_AND_TRITON)
def test_sampling_keeps_a_nan_weight_and_a_tensor_that_samples_none_as_the_reference(backend):
    # the reference prunes where u < q with q = clamp(c * exp(-|w| / tm), max=1): a NaN weight (q NaN) is kept;
    # a tensor with prune count 0 keeps every weight
    n = (3 if backend == "native" else 1) * BLOCK + 37  # the interpreter is slow
    inputs = _inputs([n, 300], [torch.float32] * 2, algo="sgd", prune="stochastic", seed=12)
    alive = masks.unpack(inputs["mask_words"][0].cpu(), n)
    live = torch.nonzero(alive).flatten()[::7].tolist()  # enough that some draw a uniform below c
    for i in live:
        inputs["params"][0][i] = float("nan")
    inputs["tensor_coefs"][1][contract.COEF_PRUNE_COUNT] = 0.0
    before = inputs["mask_words"][1].clone()
    out = {}
    for name in ("torch", backend):
        x = copy.deepcopy(inputs)
        _call(x, name, algo="sgd", prune="stochastic")
        out[name] = x
    for name, x in out.items():
        kept = masks.unpack(x["mask_words"][0].cpu(), n)
        assert kept[live].all(), name
        assert not kept.all() and torch.equal(x["mask_words"][1], before), name
    assert torch.equal(out["torch"]["mask_words"][0], out[backend]["mask_words"][0])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's NaN
@pytest.mark.parametrize("backend", NATIVE_AND_TRITON)
@pytest.mark.parametrize("algo", ["sgd", "adam"])
def test_nan_and_inf_gradients_under_selective_decay_as_the_reference(algo, backend):
    # the reference's relevance clamp(1 - |g| / (beta * gbar), min=0) and AMSGrad's torch.maximum keep a NaN:
    # a NaN gradient, or an infinite one over an infinite mean |g| of the last step (inf / inf), gives NaN
    n = BLOCK + 37
    inputs = _inputs([n, 300], [torch.float32] * 2, algo=algo, prune="none", seed=13)
    inputs["stats"][1][contract.STAT_SUM_ABS_G] = float("inf")
    bad = []
    for t, values in enumerate([(float("nan"), float("inf"), float("-inf")), (float("inf"), float("-inf"))]):
        live = torch.nonzero(masks.unpack(inputs["mask_words"][t].cpu(), inputs["params"][t].numel())).flatten()
        bad.append(live[::2][: 3 * len(values)].to(DEVICE))
        inputs["grads"][t][bad[t]] = torch.tensor(values, device=DEVICE).repeat(3)
    ref, out = copy.deepcopy(inputs), copy.deepcopy(inputs)
    _call(ref, "torch", algo=algo, prune="none")
    _call(out, backend, algo=algo, prune="none")
    assert ref["params"][1][bad[1]].isnan().all()  # inf / inf: the selective decay term is NaN
    pairs = list(zip(ref["params"], out["params"])) + [
        (a, b) for sr, so in zip(ref["state_lists"], out["state_lists"]) for a, b in zip(sr, so)
    ]
    for a, b in pairs:
        tol = 1e-6 * float(a.nan_to_num(posinf=0.0, neginf=0.0).abs().max())
        torch.testing.assert_close(b, a, rtol=1e-6, atol=tol, equal_nan=True)


SIMD_BLOCK = 256  # elements per call of the CPU driver's vector kernels (csrc/cpu_simd.h)


def _simd_version_or_skip(version: str) -> None:
    if DEVICE.type != "cpu":
        pytest.skip("the CPU driver's vector kernels")
    try:
        torch.ops.sparsetrain_native.simd_uniforms(0, 0, version)
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("version", ["portable", "avx2", "avx512"])
def test_every_vector_version_draws_the_reference_stream(version):
    """The CPU driver draws its uniforms with the version the CPU runs best: each one the CPU has is checked."""
    _simd_version_or_skip(version)
    seeds = [0, 12345, 2**40 + 977, 2**63 - 25, philox.event_seed(7, 3, 11)]
    firsts = [0, 4 * 1001, 2**34 - 128, 3 * 2**34 + 512]  # 2**34 - 128: the counter's low word carries mid-block
    for seed in seeds:
        for first in firsts:
            ours = torch.ops.sparsetrain_native.simd_uniforms(seed, first, version)
            assert torch.equal(ours, philox.rand(seed, torch.arange(first, first + SIMD_BLOCK))), (seed, first)


@pytest.mark.parametrize("version", ["portable", "avx2", "avx512"])
def test_every_vector_version_draws_listed_quads_of_the_reference_stream(version):
    """Sparse blocks draw only their live quads: each listed quad gets the reference bits, nothing else is written."""
    _simd_version_or_skip(version)
    gen = torch.Generator().manual_seed(9)
    for seed, first in [(0, 0), (2**63 - 25, 2**34 - 128), (philox.event_seed(7, 3, 11), 4 * 1001)]:
        for count in (1, 5, 16, 17, 32, 64):
            quads = torch.randperm(SIMD_BLOCK // 4, generator=gen)[:count].sort().values.to(torch.int32)
            ours = torch.ops.sparsetrain_native.simd_uniforms_quads(seed, first, quads, version)
            listed = torch.zeros(SIMD_BLOCK // 4, dtype=torch.bool)
            listed[quads.long()] = True
            listed = listed.repeat_interleave(4)
            expected = philox.rand(seed, torch.arange(first, first + SIMD_BLOCK))
            assert torch.equal(ours[listed], expected[listed]), (seed, first, count)
            assert ours[~listed].isnan().all(), (seed, first, count)


@pytest.mark.parametrize("version", ["portable", "avx2", "avx512"])
def test_every_vector_version_lists_candidates_in_order(version):
    """A block's candidates: its live elements whose uniform is not at least c, in order, whatever dead ones hold."""
    _simd_version_or_skip(version)
    gen = torch.Generator().manual_seed(8)
    for density in (0.0, 0.03, 0.5, 0.97, 1.0):
        for c in (0.0, 0.07, 0.5, 1.0):
            u = torch.rand(SIMD_BLOCK, generator=gen)
            u[::7] = c  # ties: u == c is no candidate
            live = torch.rand(SIMD_BLOCK, generator=gen) < density
            where = torch.ops.sparsetrain_native.simd_candidates(u, c, masks.pack(live), 512, version)
            expected = (live & ~(u >= torch.tensor(c, dtype=torch.float32))).nonzero().flatten().to(torch.int32)
            assert torch.equal(where, expected + 512), (density, c)


def test_many_tensors_one_call():
    gen = torch.Generator().manual_seed(4)
    sizes = torch.randint(1, 700, (40,), generator=gen).tolist()
    _run_both(sizes, [torch.float32] * len(sizes), "sgd", "stochastic", seed=4)


@pytest.mark.parametrize("algo", ["sgd", "adam"])
def test_tensors_over_many_chunks_same_for_1_and_2_threads(algo):
    sizes = [2 * CHUNK + 4099, 77, CHUNK]
    inputs = _inputs(sizes, [torch.float32] * 3, algo=algo, prune="stochastic", seed=21)
    ref = copy.deepcopy(inputs)
    _call(ref, "torch", algo=algo, prune="stochastic")
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x = copy.deepcopy(inputs)
            _call(x, "native", algo=algo, prune="stochastic")
            outs.append(x)
    finally:
        torch.set_num_threads(threads)
    assert _mask_disagreements(inputs, ref, outs[0], "stochastic") == 0
    _compare(ref, outs[0])
    for key in ("params", "mask_words", "stats", "steps"):  # bit for bit, statistics included
        assert all(torch.equal(a, b) for a, b in zip(outs[0][key], outs[1][key])), key
    for a, b in zip(outs[0]["state_lists"], outs[1]["state_lists"]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("algo", ["sgd", "adam"])
def test_event_without_statistics_decides_as_the_event_with_them(algo):
    """An event that writes no statistics takes its decisions over many blocks at once (here more candidates per
    chunk than one batch holds): weights, states and masks bit for bit those of the event writing statistics, for 1
    and 2 threads, the reference's masks, and the statistics left as they were."""
    sizes = [2 * CHUNK + 4099, 77, 3001]
    dtypes = [torch.float32, torch.float32, torch.bfloat16]
    inputs = _inputs(sizes, dtypes, algo=algo, prune="stochastic", seed=23)
    with_stats, ref = copy.deepcopy(inputs), copy.deepcopy(inputs)
    _call(with_stats, "native", algo=algo, prune="stochastic")
    _call(ref, "torch", algo=algo, prune="stochastic", write_stats=False)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = copy.deepcopy(inputs)
            _call(out, "native", algo=algo, prune="stochastic", write_stats=False)
            for key in ("params", "mask_words", "steps"):
                assert all(torch.equal(a, b) for a, b in zip(out[key], with_stats[key])), (key, n)
            for a, b in zip(out["state_lists"], with_stats["state_lists"]):
                assert all(torch.equal(x, y) for x, y in zip(a, b)), n
            assert all(torch.equal(a, b) for a, b in zip(out["stats"], inputs["stats"])), n
    finally:
        torch.set_num_threads(threads)
    assert _mask_disagreements(inputs, ref, out, "stochastic") == 0
    _compare(ref, out)
    assert sum(masks.alive_count(a) - masks.alive_count(b) for a, b in zip(inputs["mask_words"], out["mask_words"]))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("algo", ["sgd", "adam"])
def test_dead_elements_are_left_as_they_were(algo):
    n = 3 * BLOCK + 70
    inputs = _inputs([n], [torch.float32], algo=algo, prune="stochastic", seed=12)
    gen = torch.Generator().manual_seed(19)
    alive = (torch.rand(n, generator=gen) < 0.6).to(DEVICE)
    alive[:BLOCK] = False
    _set_alive(inputs, 0, alive)
    dead = ~alive
    ref, out = copy.deepcopy(inputs), copy.deepcopy(inputs)
    _call(ref, "torch", algo=algo, prune="stochastic")
    poison = torch.tensor([float("nan"), 7.0, -float("inf")], device=DEVICE).repeat(n // 3 + 1)[:n]
    out["params"][0][dead] = poison[dead]
    out["grads"][0][dead] = poison[dead]
    for states in out["state_lists"]:
        states[0][dead] = poison[dead]
    _call(out, "native", algo=algo, prune="stochastic")
    bits = lambda x: x[dead].view(torch.int32)  # noqa: E731  (bit for bit: NaN included)
    assert torch.equal(bits(out["params"][0]), bits(poison))
    for states in out["state_lists"]:
        assert torch.equal(bits(states[0]), bits(poison))
    live = ~dead
    torch.testing.assert_close(out["params"][0][live], ref["params"][0][live], rtol=1e-6, atol=1e-7)
    assert torch.equal(out["mask_words"][0], ref["mask_words"][0])
    torch.testing.assert_close(out["stats"][0], ref["stats"][0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("algo", ["sgd", "adam"])
def test_sampling_event_on_sparse_masks(algo):
    """Blocks with few live quads draw only those quads' uniforms (others all of them): the reference's masks."""
    sizes = [8 * SIMD_BLOCK + 77, 999]
    inputs = _inputs(sizes, [torch.float32] * 2, algo=algo, prune="stochastic", seed=31)
    gen = torch.Generator().manual_seed(32)
    for t, n in enumerate(sizes):  # a density per block of 256 elements, from 0 to 0.5: both sides of the limit
        density = (torch.rand(n // SIMD_BLOCK + 1, generator=gen) * 0.5).repeat_interleave(SIMD_BLOCK)[:n]
        _set_alive(inputs, t, (torch.rand(n, generator=gen) < density).to(DEVICE))
    ref, out = copy.deepcopy(inputs), copy.deepcopy(inputs)
    _call(ref, "torch", algo=algo, prune="stochastic")
    _call(out, "native", algo=algo, prune="stochastic")
    assert _mask_disagreements(inputs, ref, out, "stochastic") == 0
    _compare(ref, out)
    newly_pruned = sum(
        masks.alive_count(a) - masks.alive_count(b) for a, b in zip(inputs["mask_words"], out["mask_words"])
    )
    assert newly_pruned > 0


def test_found_inf_skips_everything():
    inputs = _inputs([BLOCK + 3, 40], [torch.float32] * 2, algo="sgd", prune="stochastic", seed=6)
    x = copy.deepcopy(inputs)
    from sparsetrain.backends import native

    native.sgd_step(
        x["params"], x["grads"], x["state_lists"][0], x["steps"], mask_words=x["mask_words"], stats=x["stats"],
        tensor_coefs=x["tensor_coefs"], group_coefs=x["group_coefs"], group_inner=x["group_inner"],
        shard_offsets=[], seeds=x["seeds"], found_inf=torch.tensor(True, device=DEVICE), lr=0.1, lr_tensor=None,
        weight_decay=0.0, momentum=0.9, dampening=0.0, nesterov=False, maximize=False, prune="stochastic",
        regularize=True, l1_proximal=True,
    )  # fmt: skip
    for key in ("params", "mask_words", "stats", "steps"):
        assert all(torch.equal(a, b) for a, b in zip(inputs[key], x[key]))


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda x: x["grads"].pop(), "grads has 1 tensors, expected 2"),
        (lambda x: x["stats"].__setitem__(1, x["stats"][1].float()), r"stats\[1\] has dtype Float"),
        (lambda x: x["mask_words"].__setitem__(0, x["mask_words"][0][:-1]), r"mask_words\[0\] has"),
        (lambda x: x["state_lists"][0].__setitem__(1, x["state_lists"][0][1][:5]), "optimizer state"),
        (lambda x: x["params"].__setitem__(1, x["params"][1].double()), r"params\[1\] has dtype Double"),
    ],
)
def test_bad_input_names_the_problem_and_modifies_nothing(spoil, message):
    inputs = _inputs([BLOCK + 3, 40], [torch.float32] * 2, algo="sgd", prune="low", seed=8)
    x = copy.deepcopy(inputs)
    spoil(x)
    before = copy.deepcopy(x)
    with pytest.raises(RuntimeError, match=message):
        _call(x, "native", algo="sgd", prune="low")
    for key in ("params", "mask_words", "stats", "steps"):
        assert all(torch.equal(a, b) for a, b in zip(before[key], x[key]))
    for a, b in zip(before["state_lists"][0], x["state_lists"][0]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_optimizer_on_native_backend_matches_torch_optim(name):
    kwargs = {
        "SGD": dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3, nesterov=False),
        "Adam": dict(lr=1e-2, weight_decay=1e-2, amsgrad=True),
        "AdamW": dict(lr=1e-2, weight_decay=0.1, maximize=True),
    }[name]
    ours = make_params([(1025, 3), (33,), (5, 7), (300, 70)], device=DEVICE)
    ref = clone_params(ours)
    opt = getattr(sparsetrain.optim, name)(ours, backend="native", **kwargs)
    ref_opt = getattr(torch.optim, name)(ref, **kwargs)
    for step in range(50):
        set_grads([ours, ref], step, none_every=3 if step % 2 else 0)
        opt.step()
        ref_opt.step()
    assert opt.backend == "native"
    assert max_rel_err(ours, ref) <= 1e-6


def test_without_the_extension_info_says_why_and_auto_uses_the_reference():
    code = (
        "import sys; sys.modules['sparsetrain._C'] = None\n"  # as if the install had not built it
        "import torch, sparsetrain\n"
        "from sparsetrain import backends\n"
        "from sparsetrain.cli import info\n"
        "print(backends.resolve('auto', torch.device('cpu')))\n"
        "print(info())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[0] == "torch"
    assert any(
        line.startswith("  native  not usable: the extension sparsetrain._C is not available (") for line in lines
    )
    assert any(line.startswith("native build: ") for line in lines)
