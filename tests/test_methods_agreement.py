"""Methods agree with their peers: torch.nn.utils.prune, the GReg rules, the stochastic law."""

import math

import pytest
import torch
from scipy import stats as scipy_stats
from torch import nn
from torch.nn.utils import prune

import sparsetrain
from sparsetrain import contract, methods, ops, philox
from sparsetrain.selection import kth_smallest_abs


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.Flatten(), nn.Linear(6 * 3 * 3, 5))


def _twins(seed=0):
    a = _model(seed)
    b = _model(seed)
    b.load_state_dict(a.state_dict())
    return a, b


def _attach(model, method, **kw):
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1, backend="torch")
    return sparsetrain.Pruner(model, opt, method, **kw), opt


LAYERS = ["0", "2", "4"]


@pytest.mark.parametrize("amount", [0.3, 0.77])
def test_oneshot_layer_matches_l1_unstructured(amount):
    ours, ref = _twins()
    pruner, _ = _attach(ours, methods.Magnitude(amount))
    for name in LAYERS:
        prune.l1_unstructured(dict(ref.named_modules())[name], "weight", amount=amount)
        assert torch.equal(pruner.mask(name), dict(ref.named_modules())[name].weight_mask.bool())


def test_oneshot_global_matches_global_unstructured():
    ours, ref = _twins(1)
    pruner, _ = _attach(ours, methods.Magnitude(0.45, scope="global"))
    modules = dict(ref.named_modules())
    prune.global_unstructured(
        [(modules[n], "weight") for n in LAYERS], pruning_method=prune.L1Unstructured, amount=0.45
    )
    for name in LAYERS:
        assert torch.equal(pruner.mask(name), modules[name].weight_mask.bool())


@pytest.mark.parametrize("norm", [1, 2])
def test_oneshot_filters_match_ln_structured(norm):
    ours, ref = _twins(2)
    pruner, _ = _attach(ours, methods.Magnitude(0.5, structure="filters", norm=norm), coupled=False)
    modules = dict(ref.named_modules())
    for name in LAYERS:
        prune.ln_structured(modules[name], "weight", amount=0.5, n=norm, dim=0)
        assert torch.equal(pruner.mask(name), modules[name].weight_mask.bool())
        bias_alive = pruner.optimizer.mask(dict(ours.named_modules())[name].bias)
        assert torch.equal(
            bias_alive, modules[name].weight_mask.reshape(modules[name].weight.shape[0], -1)[:, 0].bool()
        )


def test_largest_prunes_the_largest():
    model = _model(3)
    weights = {n: dict(model.named_modules())[n].weight.detach().clone() for n in LAYERS}
    pruner, _ = _attach(model, methods.Magnitude(0.2, largest=True))
    for name, w in weights.items():
        alive = pruner.mask(name)
        k = round(0.2 * w.numel())
        assert int((~alive).sum()) == k
        assert float(w[~alive].abs().min()) > float(w[alive].abs().max())


def test_radix_select_equals_kthvalue():
    gen = torch.Generator().manual_seed(5)
    tensors = [torch.randn(n, generator=gen) * s for n, s in ((1001, 1.0), (77, 30.0), (5000, 1e-3))]
    tensors.append(torch.zeros(40))
    flat = torch.cat([t.abs() for t in tensors])
    for k in (1, 40, 41, 777, 3000, flat.numel()):
        assert kth_smallest_abs(tensors, k) == float(torch.kthvalue(flat, k).values)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_iterative_magnitude_follows_schedule(scope):
    model = _model(4)
    method = methods.Magnitude(0.6, scope=scope, schedule="linear", start=0, end=20, interval=5)
    pruner, opt = _attach(model, method)
    x = torch.randn(4, 3, 7, 7)
    for step in range(25):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if step % 5 == 0 and step <= 20:
            total = sum(t.param.numel() for t in pruner.targets)
            dead = sum(int((~pruner.mask(t.param)).sum()) for t in pruner.targets)
            level = method.level(step)
            # the decision is on the updated weights with a threshold from the pre-step ones
            assert abs(dead / total - 0.6 * level) < 0.03, (step, dead / total, 0.6 * level)


# ----------------------------------------------------------------------------------- GReg
def _greg_model():
    torch.manual_seed(7)
    return nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 3))


def _train(model, opt, steps, x):
    for _ in range(steps):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_greg1_pick_grow_ceiling_stabilize_prune():
    model = _greg_model()
    convs = [model[0], model[2]]
    expected_picks = []
    for conv in convs:
        scores = conv.weight.detach().abs().reshape(conv.out_channels, -1).mean(1)
        n = min(math.ceil(0.6 * conv.out_channels), conv.out_channels - 1)
        expected_picks.append(set(torch.topk(scores, n, largest=False).indices.tolist()))
    method = methods.GReg1(0.6, update_interval=3, delta=0.1, ceiling=0.45, stabilize=4, mag_ratio_limit=1e9)
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, backend="torch")
    pruner = sparsetrain.Pruner(model, opt, method, coupled=False)  # the official per-layer rule
    assert [set(method.picked[name].tolist()) for name in ("0", "2")] == expected_picks
    x = torch.randn(3, 2, 9, 9)
    lam_seen = []
    for _ in range(30):
        _train(model, opt, 1, x)
        lam_seen.append(opt.state[convs[0].weight]["group_coefs"][contract.GROUP_LAM].clone())
    # growth: +delta on the picked groups at steps 0, 3, 6, ..., kept groups stay at 0
    picked = sorted(expected_picks[0])
    kept = sorted(set(range(8)) - expected_picks[0])
    assert torch.allclose(lam_seen[0][picked], torch.full((len(picked),), 0.1))
    assert torch.allclose(lam_seen[2][picked], torch.full((len(picked),), 0.1))
    assert torch.allclose(lam_seen[3][picked], torch.full((len(picked),), 0.2))
    assert torch.all(lam_seen[3][kept] == 0)
    # stop when lam > ceiling: 0.5 after the 5th update (step 12); then 4 held steps; prune at step 17
    assert torch.allclose(lam_seen[12][picked], torch.full((len(picked),), 0.5))
    assert torch.allclose(lam_seen[16][picked], torch.full((len(picked),), 0.5))
    assert method.pruned_at == 17
    for conv, pick in zip(convs, expected_picks):
        alive = pruner.mask(conv.weight)
        dead_filters = {i for i in range(alive.shape[0]) if not alive[i].any()}
        assert dead_filters == pick
        assert torch.all(conv.weight.detach()[sorted(pick)] == 0)
        assert torch.all(conv.bias.detach()[sorted(pick)] == 0)
        assert torch.all(opt.state[conv.weight]["momentum_buffer"][sorted(pick)] == 0)


def test_greg1_magnitude_ratio_stop():
    model = _greg_model()
    method = methods.GReg1(0.5, update_interval=1, delta=0.5, ceiling=1e9, stabilize=0, mag_ratio_limit=3.0)
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.2, backend="torch")
    sparsetrain.Pruner(model, opt, method, coupled=False)
    x = torch.randn(3, 2, 9, 9)
    for _ in range(200):
        _train(model, opt, 1, x)
        if method.phase == "pruned":
            break
    assert method.phase == "pruned"
    for name in ("0", "2"):
        assert method.ema[name] >= 3.0 and method.lam[name] < 1e9


def test_greg2_warmup_then_pick_and_kept_lam():
    model = _greg_model()
    method = methods.GReg2(
        0.5,
        delta_all=0.01,
        warm_ceiling=0.03,
        kept_lam=-1e-4,
        update_interval=2,
        delta=0.1,
        ceiling=0.35,
        stabilize=2,
        mag_ratio_limit=1e9,
    )
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.05, backend="torch")
    sparsetrain.Pruner(model, opt, method, coupled=False)
    x = torch.randn(3, 2, 9, 9)
    table = opt.state[model[0].weight]["group_coefs"]
    _train(model, opt, 1, x)  # step 0: first warm update
    assert torch.allclose(table[contract.GROUP_LAM], torch.full((8,), 0.01))
    _train(model, opt, 4, x)  # steps 1-4: warm updates at 2, 4 -> 0.03 reached -> pick
    assert method.phase == "grow"
    picked = method.picked["0"]
    kept = sorted(set(range(8)) - set(picked.tolist()))
    assert torch.allclose(table[contract.GROUP_LAM][kept], torch.full((len(kept),), -1e-4))
    assert torch.allclose(table[contract.GROUP_LAM][picked], torch.full((len(picked),), 0.03))
    _train(model, opt, 2, x)  # step 6: picked grow by delta
    assert torch.allclose(table[contract.GROUP_LAM][picked], torch.full((len(picked),), 0.13))
    _train(model, opt, 20, x)
    assert method.phase == "pruned"


# ----------------------------------------------------------------------------- stochastic
def test_stochastic_frequency_per_magnitude_bin_matches_q():
    """Pruned counts per |w| bin equal sum(q) within 4.5 standard deviations (Bonferroni over bins)."""
    n = 120_000
    gen = torch.Generator().manual_seed(21)
    w = torch.randn(n, generator=gen) * 0.2
    grad = torch.zeros(n)
    tm, count = 0.1, 30_000.0
    kernel_sum = float(torch.exp(-w.abs().double() / tm).sum())
    stats = torch.tensor([n, float(w.abs().sum()), kernel_sum, 0.0, tm], dtype=torch.float64)
    coefs = torch.zeros(contract.NUM_COEFS)
    coefs[contract.COEF_PRUNE_COUNT] = count
    mask_words = sparsetrain.masks.full(n)
    seed = philox.event_seed(99, 0, 0)
    before = w.clone()
    ops.sgd_step_(
        [w],
        [grad],
        [],
        [torch.zeros(())],
        mask_words=[mask_words],
        stats=[stats],
        tensor_coefs=[coefs],
        group_coefs=[],
        group_inner=[],
        shard_offsets=[],
        seeds=torch.tensor([seed]),
        found_inf=None,
        lr=0.0,
        lr_tensor=None,
        weight_decay=0.0,
        momentum=0.0,
        dampening=0.0,
        nesterov=False,
        maximize=False,
        prune="stochastic",
        regularize=False,
        l1_proximal=True,
        backend="torch",
    )
    pruned = ~sparsetrain.masks.unpack(mask_words, n)
    q = (count / kernel_sum * torch.exp(-before.abs().double() / tm)).clamp(max=1)
    edges = torch.quantile(before.abs().double(), torch.linspace(0, 1, 11, dtype=torch.float64))
    bins = torch.bucketize(before.abs().double(), edges[1:-1])
    z_bound = scipy_stats.norm.ppf(1 - 0.001 / 2 / 10)  # two-sided, family-wise error 0.1% over 10 bins
    for b in range(10):
        in_bin = bins == b
        mean = float(q[in_bin].sum())
        sd = float((q[in_bin] * (1 - q[in_bin])).sum().sqrt())
        observed = int(pruned[in_bin].sum())
        assert abs(observed - mean) <= z_bound * sd + 1e-9, (b, observed, mean, sd)
    expected_total = float(q.sum())
    assert abs(expected_total - count) / count < 0.01  # clamp at 1 is rare here
    assert abs(int(pruned.sum()) - expected_total) <= z_bound * float((q * (1 - q)).sum().sqrt())


def test_stochastic_schedule_and_final_sparsity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    method = methods.StochasticMagnitude(0.9, start=5, end=65, schedule="cubic", interval=3, temperature=0.5, l2=1e-4)
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, backend="torch", seed=3)
    pruner = sparsetrain.Pruner(model, opt, method)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    deviations = []
    for step in range(80):
        nn.functional.cross_entropy(model(x), y).backward()
        dead_before = [int((~pruner.mask(t.param)).sum()) for t in pruner.targets]
        opt.step()
        opt.zero_grad()
        if method.is_event(step):
            for t, before in zip(pruner.targets, dead_before):
                wanted = method.level(step) * t.ratio * t.param.numel()
                dead = int((~pruner.mask(t.param)).sum())
                # the event prunes a sum of Bernoulli(q) whose mean is max(wanted - before, 0) (calibrated on
                # the previous step's statistics): standard deviation at most the square root of the mean
                expected = max(wanted - before, 0.0)
                deviations.append(abs(dead - before - expected) / max(expected, 1.0) ** 0.5)
    # each event lands on the schedule, within 4.5 standard deviations of its sampling noise
    assert len(deviations) == 63 and max(deviations) < 4.5, max(deviations)
    for t in pruner.targets:
        sparsity = float((~pruner.mask(t.param)).float().mean())
        assert abs(sparsity - 0.9) <= 0.005, (t.name, sparsity)
