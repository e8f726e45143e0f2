"""Parameters in any dense layout (channels_last convolutions, transposed views) step in place on every
backend, to the weights, states and masks of the same parameters stored contiguously: element indices
(and with them the random stream, the group index and the mask bits) follow the logical order."""

import pytest
import torch
from conftest import DEVICE

import sparsetrain
from sparsetrain import backends

BACKENDS = [b for b in backends.BACKENDS if backends.runs_on(b, DEVICE)[0]]


def _layouts(seed):
    gen = torch.Generator().manual_seed(seed)
    conv = torch.randn(6, 5, 3, 3, generator=gen)
    linear_t = torch.randn(7, 9, generator=gen)  # stored as the transpose of a [9, 7] tensor
    bias = torch.randn(6, generator=gen)
    contiguous = [conv.clone(), linear_t.clone(), bias.clone()]
    other = [conv.clone().to(memory_format=torch.channels_last), linear_t.t().contiguous().t(), bias.clone()]
    assert not other[0].is_contiguous() and not other[1].is_contiguous()
    return [[t.to(DEVICE).requires_grad_() for t in ts] for ts in (contiguous, other)]


def _run(params, backend, algo, steps=4):
    if algo == "sgd":
        opt = sparsetrain.optim.SGD(params, lr=0.1, momentum=0.9, backend=backend, seed=3)
    else:
        opt = sparsetrain.optim.AdamW(params, lr=1e-2, backend=backend, seed=3)
    for p in params[:2]:
        opt.enable_pruning(p, groups=p.shape[0])
        opt.set_coefs(p, l2=1e-3, temperature=0.5, prune_count=0.2 * p.numel())
    addresses = [p.data_ptr() for p in params]
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        for p in params:  # the same gradient values, in the parameter's own layout
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen))
        if step % 2:
            opt.schedule_pruning("stochastic")
        opt.step()
    assert [p.data_ptr() for p in params] == addresses  # stepped in place
    return opt


@pytest.mark.parametrize("algo", ["sgd", "adamw"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_any_dense_layout_steps_like_the_contiguous_one(backend, algo):
    contiguous, other = _layouts(seed=1)
    opt_a, opt_b = _run(contiguous, backend, algo), _run(other, backend, algo)
    assert other[0].is_contiguous(memory_format=torch.channels_last)  # the layout is kept
    assert other[1].stride() == (1, 7)
    for a, b in zip(contiguous, other):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=0)
        for key, value in opt_a.state[a].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(opt_b.state[b][key], value, rtol=0, atol=0, msg=key)
    for a, b in zip(contiguous[:2], other[:2]):  # mask bits in logical element order
        assert torch.equal(opt_a.state[a]["mask_words"], opt_b.state[b]["mask_words"])
    dead = [int((p.detach() == 0).sum()) for p in other[:2]]
    assert all(d > 0 for d in dead)  # the events pruned something
