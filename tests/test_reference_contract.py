"""The torch reference backend implements the per-element contract of docs/design.md.

Each check computes the expected result independently, element by element in float64 numpy-free
torch, from the contract's formulas, on odd sizes.
"""

import torch
from helpers import make_params

import sparsetrain
from sparsetrain import contract, masks, philox


def _prunable_sgd(shapes, seed=0, **kw):
    params = make_params(shapes, seed=seed)
    opt = sparsetrain.optim.SGD(params, lr=0.1, backend="torch", **kw)
    for p in params:
        opt.enable_pruning(p)
    return params, opt


def _grads(params, step):
    gen = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_pruned_weights_and_momentum_never_revive():
    params, opt = _prunable_sgd([(41, 3)], momentum=0.9)
    (p,) = params
    alive = torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.6
    _grads(params, 0)
    opt.step()  # momentum buffers now nonzero everywhere
    opt.set_mask(p, alive)
    for step in range(1, 6):
        _grads(params, step)
        opt.step()
        assert torch.all(p.detach()[~alive] == 0)
        assert torch.all(opt.state[p]["momentum_buffer"][~alive] == 0)
        assert torch.equal(opt.mask(p), alive)


def test_threshold_low_and_high():
    for mode, compare in (("low", torch.lt), ("high", torch.gt)):
        params, opt = _prunable_sgd([(57,)], seed=2)
        (p,) = params
        opt.set_coefs(p, threshold=0.7)
        _grads(params, 0)
        expected_w = p.detach() - 0.1 * p.grad
        opt.schedule_pruning(mode)
        opt.step()
        pruned = compare(expected_w.abs(), 0.7)
        assert torch.equal(opt.mask(p), ~pruned)
        torch.testing.assert_close(p.detach(), torch.where(pruned, 0.0, expected_w))


def test_group_flags_prune_whole_groups():
    params = make_params([(6, 4, 3)], seed=5)
    (p,) = params
    opt = sparsetrain.optim.SGD(params, lr=0.1, backend="torch")
    opt.enable_pruning(p, groups=4, group_inner=3)  # input channels of a [out, in, k] weight
    opt.uses_groups = True
    opt.state[p]["group_coefs"][contract.GROUP_PRUNE, 1] = 1.0
    _grads(params, 0)
    opt.schedule_pruning("group")
    opt.step()
    expected = torch.ones(6, 4, 3, dtype=torch.bool)
    expected[:, 1, :] = False
    assert torch.equal(opt.mask(p), expected)


def test_group_lam_regularization():
    params = make_params([(5, 7)], seed=6)
    (p,) = params
    opt = sparsetrain.optim.SGD(params, lr=0.1, backend="torch")
    opt.enable_pruning(p, groups=5)
    opt.uses_groups = True
    lam = torch.tensor([0.0, 0.5, 1.0, 0.0, 2.0])
    opt.state[p]["group_coefs"][contract.GROUP_LAM] = lam
    _grads(params, 0)
    expected = p.detach() - 0.1 * (p.grad + lam[:, None] * p.detach())
    opt.step()
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)


def test_l1_proximal_reaches_exact_zeros_and_subgradient_form():
    for proximal in (True, False):
        params = make_params([(101,)], seed=7)
        (p,) = params
        opt = sparsetrain.optim.SGD(params, lr=0.5, backend="torch", l1_proximal=proximal)
        opt.enable_pruning(p)
        opt.set_coefs(p, l1=0.8)
        p.grad = torch.zeros_like(p)
        w0 = p.detach().clone()
        opt.step()
        if proximal:
            expected = torch.sign(w0) * (w0.abs() - 0.4).clamp(min=0)
            assert int((p.detach() == 0).sum()) == int((w0.abs() <= 0.4).sum()) > 0
        else:
            expected = w0 - 0.5 * 0.8 * torch.sign(w0)
        torch.testing.assert_close(p.detach(), expected)


def test_selective_decay_uses_previous_mean_gradient():
    params, opt = _prunable_sgd([(64,)], seed=8)
    (p,) = params
    opt.set_coefs(p, sd=0.3, sd_beta=2.0)
    _grads(params, 0)
    opt.step()  # first step: gbar from the initial (zero) statistic -> no selective decay
    gbar = float(opt.state[p]["stats"][contract.STAT_SUM_ABS_G] / opt.state[p]["stats"][contract.STAT_ALIVE])
    torch.testing.assert_close(gbar, float(p.grad.abs().mean()), rtol=1e-6, atol=0)
    _grads(params, 1)
    w, g = p.detach().clone(), p.grad.clone()
    factor = (1 - g.abs() / (2.0 * gbar)).clamp(min=0)
    expected = w - 0.1 * (g + 0.3 * w * factor)
    opt.step()
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)


def test_stochastic_decision_is_u_below_q_on_the_shared_stream():
    params, opt = _prunable_sgd([(97, 13)], seed=9)
    (p,) = params
    opt.set_coefs(p, temperature=0.5, prune_count=200)
    _grads(params, 0)
    opt.step()  # builds the kernel-sum statistic
    stats = opt.state[p]["stats"].clone()
    _grads(params, 1)
    w_new = (p.detach() - 0.1 * p.grad).reshape(-1)
    opt.schedule_pruning("stochastic")
    opt.step()
    c = 200 / float(stats[contract.STAT_SUM_KERNEL])
    q = (c * torch.exp(-w_new.abs() / float(stats[contract.STAT_TM]))).clamp(max=1)
    u = philox.rand(philox.event_seed(opt.base_seed, 0, 0), torch.arange(p.numel()))
    expected_pruned = u < q
    tie = (u - q).abs() <= 1e-6
    got_pruned = ~opt.mask(p).reshape(-1)
    assert int((got_pruned != expected_pruned)[~tie].sum()) == 0
    assert opt.prune_events == 1


def test_statistics_after_step():
    params, opt = _prunable_sgd([(33, 3)], seed=10)
    (p,) = params
    opt.set_coefs(p, temperature=2.0)
    opt.set_mask(p, torch.arange(99).reshape(33, 3) % 4 != 0)
    prev = opt.state[p]["stats"].clone()
    _grads(params, 0)
    g = p.grad.clone()
    opt.step()
    alive = opt.mask(p)
    w = p.detach().double()
    tm = 2.0 * float(prev[contract.STAT_SUM_ABS_W] / prev[contract.STAT_ALIVE])
    expected = torch.tensor(
        [alive.sum(), w.abs().sum(), (torch.exp(-w.abs() / tm) * alive).sum(), (g.double().abs() * alive).sum(), tm],
        dtype=torch.float64,
    )
    torch.testing.assert_close(opt.state[p]["stats"], expected, rtol=1e-6, atol=0)
    assert masks.alive_count(opt.state[p]["mask_words"]) == 99 - 25
