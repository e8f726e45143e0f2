"""The Triton backend computes the torch reference's function (run under TRITON_INTERPRET=1 on CPU).

Every case runs the same op call on two copies of fresh random inputs, one per backend, and
compares weights, optimizer states, statistics and step counts (fp32: relative error at most 1e-6;
bf16 / fp16: at most two units in the last place of the dtype), and masks exactly except in
the tie band of docs/design.md ("The random stream") |u - q| <= 1e-6, where exp() may differ by ulps.
"""

import copy

import pytest
import torch
from conftest import DEVICE, triton_usable
from helpers import to_device

import sparsetrain
from sparsetrain import contract, masks, ops, philox

pytestmark = pytest.mark.skipif(not triton_usable()[0], reason=triton_usable()[1])

BLOCK = 1024
SIZES = [1, 31, 33, BLOCK - 1, BLOCK + 1, 3 * BLOCK + 70]
TOL = {torch.float32: 1e-6, torch.bfloat16: 2 * 2**-8, torch.float16: 2 * 2**-11}


def _inputs(sizes, dtypes, *, algo, prune, seed, states=True, groups=3, shard_offsets=None, state_dtype=torch.float32):
    """Fresh random op inputs; ``state_dtype`` ``None``: each tensor's buffers in its parameter's dtype."""
    gen = torch.Generator().manual_seed(seed)
    params, grads, alive_masks = [], [], []
    for n, dtype in zip(sizes, dtypes):
        alive = torch.rand(n, generator=gen) < 0.85
        if n > BLOCK:
            alive[:BLOCK] = False  # one fully pruned block
        alive_masks.append(alive)
        params.append((torch.randn(n, generator=gen) * alive).to(dtype))
        grads.append(torch.randn(n, generator=gen).to(dtype))
    num_states = {"sgd": 1, "adam": 3}[algo]
    state_lists = [
        [(torch.rand(n, generator=gen) * a).to(state_dtype or d) for n, a, d in zip(sizes, alive_masks, dtypes)]
        for _ in range(num_states)
    ]
    stats = []
    for p, a in zip(params, alive_masks):
        w = p.double().abs()
        stats.append(
            torch.tensor([a.sum(), w.sum(), (torch.exp(-w / 0.3) * a).sum(), 0.8 * a.sum(), 0.3], dtype=torch.float64)
        )
    coefs = []
    for n in sizes:
        c = torch.zeros(contract.NUM_COEFS)
        c[contract.COEF_L2], c[contract.COEF_L1], c[contract.COEF_SD], c[contract.COEF_SD_BETA] = 1e-2, 1e-2, 0.5, 1.5
        c[contract.COEF_THRESHOLD] = 0.4
        c[contract.COEF_PRUNE_COUNT] = max(1.0, 0.2 * n)
        c[contract.COEF_TEMPERATURE] = 0.7
        coefs.append(c)
    group_coefs = [
        torch.stack([torch.rand(groups, generator=gen) * 0.1, (torch.rand(groups, generator=gen) < 0.4).float()])
        for _ in sizes
    ]
    inputs = dict(
        params=params,
        grads=grads,
        state_lists=state_lists,
        steps=[torch.tensor(3.0) for _ in sizes],
        mask_words=[masks.pack(a) for a in alive_masks],
        stats=stats,
        tensor_coefs=coefs,
        group_coefs=group_coefs,
        group_inner=[max(1, n // groups // 2) for n in sizes],
        shard_offsets=shard_offsets if shard_offsets is not None else [],
        seeds=torch.tensor([philox.event_seed(seed, t, 2) for t in range(len(sizes))], dtype=torch.int64),
    )
    return to_device(inputs, DEVICE)


def _call(
    inputs, backend, *, algo, prune, regularize=True, l1_proximal=True, lr_tensor=None, write_stats=True, **hyper
):
    x = inputs
    common = dict(
        mask_words=x["mask_words"],
        stats=x["stats"],
        write_stats=write_stats,
        tensor_coefs=x["tensor_coefs"],
        group_coefs=x["group_coefs"],
        group_inner=x["group_inner"],
        shard_offsets=x["shard_offsets"],
        seeds=x["seeds"],
        found_inf=None,
        lr=0.05,
        lr_tensor=lr_tensor,
        prune=prune,
        regularize=regularize,
        l1_proximal=l1_proximal,
        backend=backend,
    )
    if algo == "sgd":
        ops.sgd_step_(
            x["params"],
            x["grads"],
            x["state_lists"][0],
            x["steps"],
            weight_decay=1e-3,
            momentum=hyper.get("momentum", 0.9),
            dampening=hyper.get("dampening", 0.1),
            nesterov=False,
            maximize=hyper.get("maximize", False),
            **common,
        )
    else:
        ops.adam_step_(
            x["params"],
            x["grads"],
            x["state_lists"][0],
            x["state_lists"][1],
            x["state_lists"][2],
            x["steps"],
            beta1=0.9,
            beta2=0.99,
            eps=1e-8,
            weight_decay=1e-2,
            decoupled=hyper.get("decoupled", True),
            amsgrad=True,
            maximize=hyper.get("maximize", False),
            **common,
        )


def _compare(ref, out):
    for t, (a, b) in enumerate(zip(ref["params"], out["params"])):
        tol = TOL[a.dtype]
        torch.testing.assert_close(
            b.float(),
            a.float(),
            rtol=tol,
            atol=tol * float(a.float().abs().max()) + 1e-30,
            msg=lambda m, t=t: f"params[{t}]: {m}",
        )
    for states_ref, states_out in zip(ref["state_lists"], out["state_lists"]):
        for a, b in zip(states_ref, states_out):
            # 16-bit weights feed the regularization and the decisions: states follow them within 1e-2;
            # 16-bit states are computed in fp32 and rounded once (the interpreter truncates: 1 ulp more)
            lowp = any(p.dtype != torch.float32 for p in ref["params"])
            tol = max(1e-2 if lowp else 1e-6, TOL[a.dtype])
            torch.testing.assert_close(b, a, rtol=tol, atol=tol * float(a.float().abs().max()) + 1e-30)
    for a, b in zip(ref["stats"], out["stats"]):
        torch.testing.assert_close(
            b, a, rtol=1e-5 if any(p.dtype != torch.float32 for p in ref["params"]) else 1e-6, atol=1e-9
        )
    for a, b in zip(ref["steps"], out["steps"]):
        assert float(a) == float(b) == 4.0


def _mask_disagreements(before, ref, out, prune):
    """Count mask disagreements outside the tie band (stochastic) or anywhere (other modes)."""
    bad = 0
    for t, (a, b) in enumerate(zip(ref["mask_words"], out["mask_words"])):
        n = ref["params"][t].numel()
        differ = masks.unpack(a, n) != masks.unpack(b, n)
        if prune == "stochastic" and differ.any():
            stats = before["stats"][t]
            c = before["tensor_coefs"][t][contract.COEF_PRUNE_COUNT] / stats[contract.STAT_SUM_KERNEL].float()
            w_kept = torch.maximum(ref["params"][t].float().abs(), out["params"][t].float().abs())
            offsets = (before["shard_offsets"][t] if before["shard_offsets"] else 0) + torch.arange(n, device=DEVICE)
            u = philox.rand(int(before["seeds"][t]), offsets)
            # elements pruned by one backend have w = 0 there: recompute q from the other backend's weight
            q = (c * torch.exp(-w_kept / stats[contract.STAT_TM].float())).clamp(max=1)
            differ &= (u - q).abs() > 1e-6
        bad += int(differ.sum())
    return bad


def _run_both(sizes, dtypes, algo, prune, seed=0, backend="triton", **kw):
    """Run the same fresh inputs through the torch reference and ``backend``; compare everything."""
    inputs = _inputs(
        sizes,
        dtypes,
        algo=algo,
        prune=prune,
        seed=seed,
        shard_offsets=kw.pop("shard_offsets", None),
        state_dtype=kw.pop("state_dtype", torch.float32),
    )
    if "group_inner" in kw:
        inputs["group_inner"] = kw.pop("group_inner")
    ref, out = copy.deepcopy(inputs), copy.deepcopy(inputs)
    _call(ref, "torch", algo=algo, prune=prune, **kw)
    _call(out, backend, algo=algo, prune=prune, **kw)
    assert _mask_disagreements(inputs, ref, out, prune) == 0
    _compare(ref, out)
    return inputs, ref, out


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


@pytest.mark.parametrize(
    "offsets",
    [[2**32 + 7, 2**33 - 5, 3 * 2**32], [2**32 + 4, 2**33 - 4096, 12]],
    ids=["inside quads: one Philox call per element", "on quads: one call per four elements"],
)
def test_offsets_above_2_pow_32_without_allocating_them(offsets):
    inputs, ref, out = _run_both(
        [100, 1500, 33], [torch.float32] * 3, "sgd", "stochastic", seed=3, shard_offsets=offsets
    )
    # and the shard's draws really come from the high offsets: the same call at offset 0 differs
    plain, plain_out = _run_both([100, 1500, 33], [torch.float32] * 3, "sgd", "stochastic", seed=3)[0:3:2]
    assert not all(torch.equal(a, b) for a, b in zip(out["mask_words"], plain_out["mask_words"]))


@pytest.mark.parametrize(
    "inner,offsets",
    [
        ([1, 7, 1000], [0, 2**32 + 3, 5]),  # runs shorter and longer than a block, odd shard offsets
        ([3, 2**20 + 1, 333], [2**33 + 12, 2**31 - 7, 3 * 2**32]),
        ([2**30, 5, 2**31 + 3], [2**33 + 9, 0, 2**40]),  # runs near 2**31: the 64-bit group index
    ],
    ids=["short-runs", "long-runs", "wide"],
)
def test_group_index_of_any_run_and_shard_offset(inner, offsets):
    # j(i) = (i // inner) % groups on the unsharded index, with lam and group flags read at j
    _run_both([100, 1500, 2100], [torch.float32] * 3, "sgd", "group", seed=8, shard_offsets=offsets, group_inner=inner)


def test_many_tensors_one_call():
    gen = torch.Generator().manual_seed(4)
    sizes = torch.randint(1, 700, (40,), generator=gen).tolist()
    _run_both(sizes, [torch.float32] * len(sizes), "sgd", "stochastic", seed=4)


def test_deterministic_run_to_run():
    inputs = _inputs([3 * BLOCK + 5, 77], [torch.float32] * 2, algo="adam", prune="stochastic", seed=9)
    outs = []
    for _ in range(2):
        x = copy.deepcopy(inputs)
        _call(x, "triton", algo="adam", prune="stochastic")
        outs.append(x)
    for key in ("params", "mask_words", "stats"):
        assert all(torch.equal(a, b) for a, b in zip(outs[0][key], outs[1][key]))


def test_fully_pruned_block_is_left_untouched():
    inputs = _inputs([2 * BLOCK], [torch.float32], algo="sgd", prune="none", seed=2)
    x = copy.deepcopy(inputs)
    x["params"][0][:BLOCK] = float("nan")  # a dead block's values are never read (nor written)
    x["state_lists"][0][0][:BLOCK] = float("nan")
    _call(x, "triton", algo="sgd", prune="none")
    assert torch.isnan(x["params"][0][:BLOCK]).all() and torch.isnan(x["state_lists"][0][0][:BLOCK]).all()
    assert torch.isfinite(x["params"][0][BLOCK:]).all()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the poison is computed on, then dropped
@pytest.mark.parametrize("alive_fraction", [0.85, 0.05])  # full blocks streamed whole / sparse blocks predicated
@pytest.mark.parametrize("algo", ["sgd", "adam"])
def test_dead_elements_of_live_blocks_are_left_as_they_were(algo, alive_fraction):
    # dense full blocks use unmasked vector loads and stores: a dead element is read and written back
    # as is; blocks at most 1/8 live (and tails) never touch dead elements. Either way memory keeps them.
    n = 3 * BLOCK + 70  # two full live blocks and a tail block
    inputs = _inputs([n], [torch.float32], algo=algo, prune="stochastic", seed=12)
    gen = torch.Generator().manual_seed(19)
    alive = (torch.rand(n, generator=gen) < alive_fraction).to(DEVICE)
    alive[:BLOCK] = False  # one fully pruned block
    _set_alive(inputs, 0, alive)
    dead = ~alive
    dead[:BLOCK] = False  # the fully pruned block is covered by the test above
    assert dead[BLOCK : 3 * BLOCK].any() and dead[3 * BLOCK :].any()
    ref, out = copy.deepcopy(inputs), copy.deepcopy(inputs)
    _call(ref, "torch", algo=algo, prune="stochastic")
    poison = torch.tensor([float("nan"), 7.0, -float("inf")], device=DEVICE).repeat(n // 3 + 1)[:n]
    out["params"][0][dead] = poison[dead]
    out["grads"][0][dead] = poison[dead]
    for states in out["state_lists"]:
        states[0][dead] = poison[dead]
    _call(out, "triton", algo=algo, prune="stochastic")
    bits = lambda x: x[dead].view(torch.int32)  # noqa: E731  (bit for bit: NaN included)
    assert torch.equal(bits(out["params"][0]), bits(poison))
    for states in out["state_lists"]:
        assert torch.equal(bits(states[0]), bits(poison))
    live = ~dead
    torch.testing.assert_close(out["params"][0][live], ref["params"][0][live], rtol=1e-6, atol=1e-7)
    for states_ref, states_out in zip(ref["state_lists"], out["state_lists"]):
        torch.testing.assert_close(states_out[0][live], states_ref[0][live], rtol=1e-6, atol=1e-7)
    assert torch.equal(out["mask_words"][0], ref["mask_words"][0])
    torch.testing.assert_close(out["stats"][0], ref["stats"][0], rtol=1e-6, atol=1e-9)


def test_unaligned_tensors_take_the_scalar_path():
    from sparsetrain.backends import triton_backend

    sizes = [BLOCK + 3, 40]
    inputs = _inputs(sizes, [torch.float32] * 2, algo="sgd", prune="low", seed=13)
    ref, out = copy.deepcopy(inputs), copy.deepcopy(inputs)
    _call(ref, "torch", algo="sgd", prune="low")
    # the same values, but each tensor starts 4 bytes into a buffer: not 16-byte aligned
    for key in ("params", "grads"):
        out[key] = [_shifted(x) for x in out[key]]
    out["state_lists"][0] = [_shifted(x) for x in out["state_lists"][0]]
    _call(out, "triton", algo="sgd", prune="low")
    assert next(reversed(triton_backend._plans.values())).aligned == [False, False]
    _compare(ref, out)


def test_alignment_is_decided_per_tensor():
    from sparsetrain.backends import triton_backend

    sizes = [BLOCK + 3, 40, 2 * BLOCK + 5]
    inputs = _inputs(sizes, [torch.float32] * 3, algo="sgd", prune="low", seed=14)
    ref, out = copy.deepcopy(inputs), copy.deepcopy(inputs)
    _call(ref, "torch", algo="sgd", prune="low")
    out["params"][1] = _shifted(out["params"][1])  # only the middle tensor is unaligned
    _call(out, "triton", algo="sgd", prune="low")
    plan = next(reversed(triton_backend._plans.values()))
    assert plan.aligned == [True, False, True]
    assert sorted(key[1] for key, *_ in plan.launches) == [False, True]  # the others keep vector accesses
    _compare(ref, out)


def test_a_gradient_moving_to_an_unaligned_address_moves_its_tensor_to_the_scalar_launch():
    from sparsetrain.backends import triton_backend

    gen = torch.Generator().manual_seed(15)
    shapes = [(33, 40), (7,), (2 * BLOCK + 5,)]
    base = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
    runs = {}
    for backend in ("torch", "triton"):
        params = [b.clone().requires_grad_() for b in base]
        opt = sparsetrain.optim.SGD(params, lr=0.1, momentum=0.9, backend=backend)
        runs[backend] = (params, opt)
    seen = []
    moved = triton_backend._Plan.set_grad_ptrs
    triton_backend._Plan.set_grad_ptrs = lambda self, *a: seen.append(moved(self, *a)) or seen[-1]
    try:
        for step in range(3):
            grads = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
            for params, opt in runs.values():
                for p, g in zip(params, grads):
                    p.grad = _shifted(g.reshape(-1)).view(g.shape) if step == 2 and p is params[0] else g.clone()
                opt.step()
    finally:
        triton_backend._Plan.set_grad_ptrs = moved
    assert False in seen  # the cached plan saw the gradient move off alignment and was rebuilt
    assert next(reversed(triton_backend._plans.values())).aligned == [False, True, True]
    for a, b in zip(runs["torch"][0], runs["triton"][0]):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7)


def _set_alive(inputs, t, alive):
    """Give tensor ``t`` the mask ``alive``: its weights and states are zero where it is dead."""
    inputs["mask_words"][t] = masks.pack(alive)
    inputs["params"][t] *= alive
    for states in inputs["state_lists"]:
        states[t] *= alive


def _shifted(x):
    buffer = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    view = buffer[1:]
    view.copy_(x)
    assert view.data_ptr() % 16 != 0
    return view


def test_found_inf_skips_everything():
    inputs = _inputs([BLOCK + 3, 40], [torch.float32] * 2, algo="adam", prune="stochastic", seed=6)
    x = copy.deepcopy(inputs)
    common_before = copy.deepcopy(x)
    x_found = torch.tensor(True, device=DEVICE)
    ops.adam_step_(
        x["params"],
        x["grads"],
        *x["state_lists"],
        x["steps"],
        mask_words=x["mask_words"],
        stats=x["stats"],
        tensor_coefs=x["tensor_coefs"],
        group_coefs=x["group_coefs"],
        group_inner=x["group_inner"],
        shard_offsets=[],
        seeds=x["seeds"],
        found_inf=x_found,
        lr=0.1,
        lr_tensor=None,
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
        weight_decay=0.0,
        decoupled=True,
        amsgrad=True,
        maximize=False,
        prune="stochastic",
        regularize=True,
        l1_proximal=True,
        backend="triton",
    )
    for key in ("params", "mask_words", "stats", "steps"):
        assert all(torch.equal(a, b) for a, b in zip(common_before[key], x[key]))


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_optimizer_with_moving_and_missing_grads(name):
    """The cached launch plan follows gradients that are reallocated or absent from step to step."""
    from helpers import clone_params, make_params, max_rel_err, set_grads

    import sparsetrain

    kwargs = {"SGD": dict(lr=0.1, momentum=0.9), "AdamW": dict(lr=1e-2, weight_decay=0.1)}[name]
    ours = make_params([(1025, 3), (33,), (5, 7)], device=DEVICE)
    ref = clone_params(ours)
    opt = getattr(sparsetrain.optim, name)(ours, backend="triton", **kwargs)
    ref_opt = getattr(torch.optim, name)(ref, **kwargs)
    keep_alive = []
    for step in range(8):
        set_grads([ours, ref], step, none_every=3 if step % 2 else 0)
        keep_alive.append([p.grad for p in ours])  # forces new addresses for the next step's gradients
        opt.step()
        ref_opt.step()
    assert max_rel_err(ours, ref) <= 1e-6


@pytest.mark.parametrize("words, num_warps, blocks", [(8, 2, 1), (8, 4, 2), (64, 8, 8)])
def test_launch_shape_is_configurable(words, num_warps, blocks):
    from sparsetrain.backends import triton_backend

    defaults = triton_backend.configure()
    try:
        assert triton_backend.configure(words, num_warps, blocks) == (words, num_warps, blocks)
        # blocks of the new size: full ones, tails, groups with fewer blocks than a program handles
        block = words * 32
        sizes = [block - 1, block * 5 + 5, 33, block * (2 * blocks + 1)]
        _run_both(sizes, [torch.float32] * len(sizes), "adam", "stochastic", seed=14)
        plan = next(reversed(triton_backend._plans.values()))
        assert (plan.words, plan.blocks) == (words, blocks)
    finally:
        triton_backend.configure(*defaults)


@pytest.mark.parametrize(
    "bad", [dict(words=48), dict(words=0), dict(num_warps=32), dict(words=2.0), dict(blocks=3), dict(blocks=128)]
)
def test_bad_launch_shape_is_refused(bad):
    from sparsetrain.backends import triton_backend

    before = triton_backend.configure()
    assert triton_backend.configure(num_warps=0)[1] == 0  # 0: warps chosen by optimizer
    triton_backend.configure(*before)
    with pytest.raises(ValueError, match="power of two"):
        triton_backend.configure(**bad)
    assert triton_backend.configure() == before


@pytest.mark.parametrize("algo", ["sgd", "adam"])
def test_statistics_of_many_block_tensors_are_reduced_in_segments(monkeypatch, algo):
    from sparsetrain.backends import triton_backend

    # shrink the thresholds so that small tensors take the two-level reduction (odd segment tails too);
    # one block per program, so one partial row per block
    monkeypatch.setattr(triton_backend, "SEGMENT_THRESHOLD", 2)
    monkeypatch.setattr(triton_backend, "SEGMENT_ROWS", 2)
    triton_backend._plans.clear()
    before = triton_backend.configure()
    triton_backend.configure(blocks=1)
    try:
        inputs, ref, out = _run_both([5 * BLOCK + 9, 40, 3 * BLOCK], [torch.float32] * 3, algo, "stochastic", seed=15)
        plan = next(reversed(triton_backend._plans.values()))
        assert plan.segments is not None and plan.segments[0].tolist() == [0, 2, 4, 6, 7, 9]
        # run to run the same bits
        again = copy.deepcopy(inputs)
        _call(again, "triton", algo=algo, prune="stochastic")
        assert all(torch.equal(a, b) for a, b in zip(again["stats"], out["stats"]))
    finally:
        triton_backend.configure(*before)
        triton_backend._plans.clear()


@pytest.mark.parametrize("algo", ["sgd", "adam"])
def test_per_tensor_switches_off_in_the_same_launch(algo):
    # terms whose coefficient is zero are skipped per tensor (uniform branches): tensor 0 has no L1,
    # no selective decay and samples nothing, tensor 2 has no relevance scale; tensor 1 has all
    inputs = _inputs([BLOCK + 5, 2 * BLOCK + 1, 300], [torch.float32] * 3, algo=algo, prune="stochastic", seed=16)
    coefs = inputs["tensor_coefs"]
    coefs[0][contract.COEF_L1] = coefs[0][contract.COEF_SD] = coefs[0][contract.COEF_PRUNE_COUNT] = 0.0
    coefs[2][contract.COEF_SD_BETA] = 0.0
    ref, out = copy.deepcopy(inputs), copy.deepcopy(inputs)
    _call(ref, "torch", algo=algo, prune="stochastic", l1_proximal=False)
    _call(out, "triton", algo=algo, prune="stochastic", l1_proximal=False)
    assert _mask_disagreements(inputs, ref, out, "stochastic") == 0
    _compare(ref, out)
    assert torch.equal(out["mask_words"][0], inputs["mask_words"][0])  # nothing sampled there
    assert not torch.equal(out["mask_words"][1], inputs["mask_words"][1])


@pytest.mark.parametrize("algo", ["sgd", "adam"])
def test_dead_groups_and_dead_blocks_in_live_groups(algo):
    from sparsetrain.backends import triton_backend

    group = triton_backend.LaunchConfig.blocks * BLOCK  # elements per program
    n = 2 * group + BLOCK + 17  # group 0 all dead, group 1 with a dead block, a tail group
    inputs = _inputs([n, 50], [torch.float32] * 2, algo=algo, prune="stochastic", seed=17)
    alive = masks.unpack(inputs["mask_words"][0], n)
    alive[:group] = False
    alive[group + BLOCK : group + 2 * BLOCK] = False
    _set_alive(inputs, 0, alive)
    w = inputs["params"][0].double().abs()
    inputs["stats"][0][contract.STAT_ALIVE] = float(alive.sum())
    inputs["stats"][0][contract.STAT_SUM_ABS_W] = float(w.sum())
    ref, out = copy.deepcopy(inputs), copy.deepcopy(inputs)
    _call(ref, "torch", algo=algo, prune="stochastic")
    out["params"][0][:group] = float("nan")  # a dead group's values are never read (nor written)
    _call(out, "triton", algo=algo, prune="stochastic")
    assert torch.isnan(out["params"][0][:group]).all()
    out["params"][0][:group] = 0.0
    assert _mask_disagreements(inputs, ref, out, "stochastic") == 0
    _compare(ref, out)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("algo", ["sgd", "adam"])
def test_nothing_is_written_past_the_end_of_any_tensor(algo, masked):
    # every tensor is the front of a larger buffer whose tail holds a sentinel: a store past the end
    # (a tail block taken for a full one, a mask word or partial row too many) changes the tail.
    # Unmasked, every element in a full block is live, so such a store would write updated values.
    sizes = [2 * BLOCK, 3 * BLOCK + 70, BLOCK - 1, 33, 8 * BLOCK + 1]
    prune = "stochastic" if masked else "none"
    inputs = _inputs(sizes, [torch.float32] * len(sizes), algo=algo, prune=prune, seed=18)
    if not masked:
        inputs["mask_words"] = []
    pad = 4 * BLOCK
    buffers = {}

    def padded(key, x):
        buf = torch.full((x.numel() + pad,), 12345, dtype=x.dtype, device=x.device)
        buf[: x.numel()] = x.reshape(-1)
        buffers.setdefault(key, []).append(buf)
        return buf[: x.numel()].view_as(x)

    for key in ("params", "grads", "mask_words"):
        inputs[key] = [padded(key, x) for x in inputs[key]]
    inputs["state_lists"] = [[padded(f"state{i}", x) for x in s] for i, s in enumerate(inputs["state_lists"])]
    before, ref = copy.deepcopy(inputs), copy.deepcopy(inputs)
    _call(ref, "torch", algo=algo, prune=prune)
    _call(inputs, "triton", algo=algo, prune=prune)
    for key, bufs in buffers.items():
        for buf, n in zip(bufs, sizes if key != "mask_words" else [(s + 31) // 32 for s in sizes]):
            assert torch.all(buf[n:] == 12345), f"{key}: written past the end"
    assert _mask_disagreements(before, ref, inputs, prune) == 0
    _compare(ref, inputs)


def test_popcount_routes_blocks_by_their_live_count():
    x = torch.randint(-(2**31), 2**31 - 1, (64,), dtype=torch.int32)
    x[:4] = torch.tensor([-1, 0, -(2**31), 1], dtype=torch.int32)
    out = torch.empty_like(x, device=DEVICE)
    _popcount_kernel[(1,)](x.to(DEVICE), out, N=64)
    assert out.cpu().tolist() == [bin(v & 0xFFFFFFFF).count("1") for v in x.tolist()]


if triton_usable()[0]:  # a kernel resolves helpers through its module's globals
    import triton
    import triton.language as tl

    from sparsetrain.kernels.fused_step import _popcount

    @triton.jit
    def _popcount_kernel(x_ptr, out_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, _popcount(tl.load(x_ptr + i)))


def test_unsupported_parameter_dtype_is_refused_before_anything_changes():
    # fp32 sorts before fp64: a check at launch time would update the fp32 tensor, then raise
    inputs = _inputs([40, 50], [torch.float32, torch.float64], algo="sgd", prune="low", seed=20)
    before = copy.deepcopy(inputs)
    with pytest.raises(RuntimeError, match="supports fp32, bf16 and fp16 parameters, not torch.float64"):
        _call(inputs, "triton", algo="sgd", prune="low")
    for key in ("params", "steps", "mask_words"):
        assert all(torch.equal(a, b) for a, b in zip(inputs[key], before[key])), key
    assert all(torch.equal(a, b) for a, b in zip(inputs["state_lists"][0], before["state_lists"][0]))
