"""Small shared builders for the tests."""

from __future__ import annotations

import torch


def make_params(shapes, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(param_lists, step, scale=1.0, none_every=0):
    """Give each list the same gradients for ``step``; every ``none_every``-th param gets None."""
    gen = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) * scale for p in param_lists[0]]
    for params in param_lists:
        for index, (p, g) in enumerate(zip(params, grads)):
            skip = none_every and (index + step) % none_every == 0
            p.grad = None if skip else g.clone().to(p.device)


def max_rel_err(actual, expected):
    return max(float((a - e).abs().max() / e.abs().max().clamp(min=1e-30)) for a, e in zip(_d(actual), _d(expected)))


def _d(tensors):
    return [t.detach() for t in tensors]


def to_device(value, device):
    """``value`` with every tensor in it (through lists, tuples and dicts) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
