"""The optimizer steps the kernel benchmark times: sparsetrain's fused step and its peers.

Every builder takes a parameter list with gradients (from :func:`make`), the algorithm (``"sgd"``:
SGD with momentum, ``"adamw"``) and optionally a mask per tensor (``None``: all alive), and returns
a zero-argument step. The pruning step is the same everywhere: L2 regularization, the optimizer
update, stochastic sampling of about ``PRUNE_FRACTION`` of the weights with a probability that
favours small magnitudes, and the mask applied to the weight and its optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

LR, MOMENTUM, L2, TEMPERATURE, PRUNE_FRACTION = 0.01, 0.9, 1e-4, 1.0, 1e-3
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.999), 1e-8, 1e-2
ALGOS = ("sgd", "adamw")

Step = Callable[[], None]


def make(shapes: Sequence[tuple[int, ...]], device: torch.device, dtype=torch.float32, seed: int = 0) -> list[Tensor]:
    """Random parameters of ``shapes`` with random gradients."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(s, device=device, dtype=dtype, generator=gen) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, dtype=dtype, generator=gen)
    return params


def make_masks(params: Sequence[Tensor], sparsity: float, structure: str, seed: int = 1) -> list[Tensor] | None:
    """Masks pruning ``sparsity`` of each tensor: ``"unstructured"`` (random elements) or ``"structured"``
    (random rows: filters / output nodes; 1-d tensors such as biases stay alive). ``None`` at 0."""
    if sparsity == 0:
        return None
    if structure not in ("unstructured", "structured"):
        raise ValueError(f"structure must be 'unstructured' or 'structured', got {structure!r}")
    masks = []
    for index, p in enumerate(params):
        gen = torch.Generator(device=p.device).manual_seed(seed + index)
        if structure == "unstructured":
            masks.append(torch.rand(p.shape, device=p.device, generator=gen) >= sparsity)
        elif p.dim() < 2:
            masks.append(torch.ones_like(p, dtype=torch.bool))
        else:
            rows = p.shape[0]
            alive = torch.ones(rows, dtype=torch.bool, device=p.device)
            alive[torch.randperm(rows, device=p.device, generator=gen)[: round(rows * sparsity)]] = False
            masks.append(alive.view(-1, *([1] * (p.dim() - 1))).expand(p.shape).clone())
    return masks


def torch_optimizer(params: list[Tensor], algo: str) -> torch.optim.Optimizer:
    """torch's own optimizer, as fast as torch makes it here: fused on CUDA, foreach elsewhere."""
    fast = {"fused": True} if params[0].device.type == "cuda" else {"foreach": True}
    if algo == "sgd":
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, **fast)
    if algo == "adamw":
        return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **fast)
    raise ValueError(f"unknown algorithm {algo!r}; choose one of {ALGOS}")


def torch_optim_step(params: list[Tensor], algo: str, masks: list[Tensor] | None = None) -> Step:
    """torch.optim with no pruning at all (the dense step pruning is measured against)."""
    opt = torch_optimizer(params, algo)
    opt.step()
    return opt.step


def _sample_and_mask(p: Tensor, alive: Tensor, states: Sequence[Tensor]) -> None:
    scale = TEMPERATURE * p.abs().mean()
    q = torch.clamp(PRUNE_FRACTION * torch.exp(-p.abs() / scale), max=1.0)
    alive &= torch.rand_like(p) >= q
    p.mul_(alive)
    for buf in states:
        buf.mul_(alive)


def _alive(params: list[Tensor], masks: list[Tensor] | None) -> list[Tensor]:
    alive = [torch.ones_like(p, dtype=torch.bool) for p in params] if masks is None else [m.clone() for m in masks]
    with torch.no_grad():
        for p, a in zip(params, alive):
            p.mul_(a)
    return alive


def eager_pruning_step(params: list[Tensor], algo: str, masks: list[Tensor] | None = None) -> Step:
    """Pruning the way users write it today: foreach L2 on the gradients, torch's optimizer step,
    then per tensor the sampling decision and the mask applied to the weight and its state."""
    opt = torch_optimizer(params, algo)
    alive = _alive(params, masks)
    opt.step()

    @torch.no_grad()
    def step() -> None:
        grads = [p.grad for p in params]
        torch._foreach_add_(grads, params, alpha=L2)
        opt.step()
        for p, a in zip(params, alive):
            states = [b for b in opt.state[p].values() if isinstance(b, Tensor) and b.shape == p.shape]
            _sample_and_mask(p, a, states)

    return step


def compiled_pruning_step(params: list[Tensor], algo: str, masks: list[Tensor] | None = None) -> Step:
    """``torch.compile`` of the same pruning step, the update written functionally (states in the
    parameter dtype, as torch.optim keeps them). The first call compiles; the returned step has the
    seconds it took as ``compile_s``."""
    from .timing import timed_call

    alive = _alive(params, masks)
    grads = [p.grad for p in params]
    if algo == "sgd":
        bufs = [[torch.zeros_like(p) for p in params]]
        step_fn = torch.compile(_sgd_pruning)
    elif algo == "adamw":
        bufs = [[torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]]
        step_fn = torch.compile(_adamw_pruning)
    else:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {ALGOS}")
    count = torch.zeros((), dtype=torch.float32, device=params[0].device)

    def step() -> None:
        step_fn(params, grads, bufs, alive, count)

    step.compile_s = timed_call(step, params[0].device)  # type: ignore[attr-defined]
    return step


@torch.no_grad()
def _sgd_pruning(params, grads, bufs, alive, count) -> None:
    for p, g, b, a in zip(params, grads, bufs[0], alive):
        g = g + L2 * p
        b.mul_(MOMENTUM).add_(g)
        p.add_(b, alpha=-LR)
        _sample_and_mask(p, a, (b,))


@torch.no_grad()
def _adamw_pruning(params, grads, bufs, alive, count) -> None:
    count.add_(1)
    bias1 = 1 - BETAS[0] ** count
    bias2_sqrt = (1 - BETAS[1] ** count).sqrt()
    for p, g, m, v, a in zip(params, grads, bufs[0], bufs[1], alive):
        g = g + L2 * p
        p.mul_(1 - LR * WEIGHT_DECAY)
        m.lerp_(g, 1 - BETAS[0])
        v.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
        denom = v.sqrt() / bias2_sqrt + EPS
        p.sub_((LR / bias1) * m / denom)
        _sample_and_mask(p, a, (m, v))


def sparsetrain_step(params: list[Tensor], algo: str, masks: list[Tensor] | None = None, *, backend: str) -> Step:
    """sparsetrain's fused step on ``backend``: L2 + update + stochastic sampling + mask in one op call
    (every tensor pruned, its rows as groups)."""
    import sparsetrain

    if algo == "sgd":
        opt = sparsetrain.optim.SGD(params, lr=LR, momentum=MOMENTUM, backend=backend)
    elif algo == "adamw":
        opt = sparsetrain.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, backend=backend)
    else:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {ALGOS}")
    for index, p in enumerate(params):
        opt.enable_pruning(p, groups=p.shape[0] if p.dim() > 1 else 1)
        opt.set_coefs(p, l2=L2, temperature=TEMPERATURE, prune_count=PRUNE_FRACTION * p.numel())
        if masks is not None:
            opt.set_mask(p, masks[index])
    opt.step()  # statistics for the first sampling event; launch plan built

    def step() -> None:
        opt.schedule_pruning("stochastic")
        opt.step()

    return step
