"""The torch reference backend: the per-element contract of docs/design.md in plain torch, on any device.

This is the executable specification the Triton and CUDA backends are tested against. It is
written for clarity: one tensor at a time, the math in float32 (float64 for statistics), and the
optimizer updates in exactly the order ``torch.optim``'s single-tensor implementations use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import masks as mask_format
from .. import philox
from ..contract import (
    COEF_L1,
    COEF_L2,
    COEF_NM,
    COEF_PRUNE_COUNT,
    COEF_SD,
    COEF_SD_BETA,
    COEF_TEMPERATURE,
    COEF_THRESHOLD,
    GROUP_LAM,
    GROUP_PRUNE,
    STAT_ALIVE,
    STAT_SUM_ABS_G,
    STAT_SUM_ABS_W,
    STAT_SUM_KERNEL,
    STAT_TM,
    STATS_ALIVE,
    STATS_ALL,
    STATS_SUM_ABS_G,
    STATS_SUM_ABS_W,
    STATS_SUM_KERNEL,
    nm_pattern,
)


def available() -> tuple[bool, str]:
    return True, ""


@dataclass
class _Pruning:
    """The pruning and regularization arguments shared by every optimizer op."""

    mask_words: list[Tensor]
    stats: list[Tensor]
    tensor_coefs: list[Tensor]
    group_coefs: list[Tensor]
    group_inner: list[int]
    shard_offsets: list[int]
    seeds: Tensor
    prune: str
    regularize: bool
    l1_proximal: bool
    stats_mask: int = STATS_ALL  # the statistics this step computes (contract.STATS_*); 0: none, the
    # previous step's are read and left as they are

    def __post_init__(self) -> None:
        self.seed_values = self.seeds.tolist() if self.prune == "stochastic" else None

    def alive(self, t: int, numel: int, device: torch.device) -> Tensor:
        if not self.mask_words:
            return torch.ones(numel, dtype=torch.bool, device=device)
        return mask_format.unpack(self.mask_words[t], numel)

    def global_index(self, t: int, numel: int, device: torch.device) -> Tensor:
        base = self.shard_offsets[t] if self.shard_offsets else 0
        return base + torch.arange(numel, dtype=torch.int64, device=device)

    def group_index(self, t: int, numel: int, device: torch.device) -> Tensor:
        groups = self.group_coefs[t].shape[1]
        return (self.global_index(t, numel, device) // self.group_inner[t]) % groups

    def regularization(self, t: int, w: Tensor, g: Tensor) -> Tensor:
        """r = l2*w + lam[j]*w + sd*w*max(0, 1 - |g|/(beta*gbar)) [+ l1*sign(w) if not proximal]."""
        r = torch.zeros_like(w)
        if self.group_coefs:
            lam = self.group_coefs[t][GROUP_LAM].float()[self.group_index(t, w.numel(), w.device)]
            r = r + lam * w
        if not self.regularize:
            return r
        coefs = self.tensor_coefs[t].float()
        r = r + coefs[COEF_L2] * w
        if not self.l1_proximal:
            r = r + coefs[COEF_L1] * torch.sign(w)
        if self.stats:
            prev = self.stats[t]
            gbar = (prev[STAT_SUM_ABS_G] / prev[STAT_ALIVE].clamp(min=1.0)).float()
            scale = coefs[COEF_SD_BETA] * gbar
            relevance = torch.where(scale > 0, 1 - g.abs() / scale, torch.zeros_like(g))
            r = r + coefs[COEF_SD] * w * relevance.clamp(min=0)
        return r

    def proximal_l1(self, t: int, w: Tensor, lr: float | Tensor) -> Tensor:
        """Soft-threshold ``w`` by ``lr * l1`` (the default L1 form: exact zeros)."""
        if not (self.regularize and self.l1_proximal):
            return w
        shrink = lr * self.tensor_coefs[t].float()[COEF_L1]
        return torch.sign(w) * (w.abs() - shrink).clamp(min=0)

    def decide(self, t: int, w: Tensor, alive: Tensor) -> Tensor:
        """The new alive bits after this step's pruning decision on the updated weights."""
        if self.prune == "none":
            return alive
        coefs = self.tensor_coefs[t].float()
        if self.prune == "stochastic":
            prev = self.stats[t]
            count, kernel_sum, tm = coefs[COEF_PRUNE_COUNT], prev[STAT_SUM_KERNEL].float(), prev[STAT_TM].float()
            if not (count > 0 and kernel_sum > 0 and tm > 0):
                return alive
            q = torch.clamp(count / kernel_sum * torch.exp(-w.abs() / tm), max=1.0)
            u = philox.rand(self.seed_values[t], self.global_index(t, w.numel(), w.device))
            return alive & ~(u < q)
        if self.prune == "low":
            return alive & ~(w.abs() < coefs[COEF_THRESHOLD])
        if self.prune == "high":
            return alive & ~(w.abs() > coefs[COEF_THRESHOLD])
        if self.prune == "nm":
            return nm_keep(coefs[COEF_NM], w, alive, self.shard_offsets[t] if self.shard_offsets else 0)
        flagged = self.group_coefs[t][GROUP_PRUNE][self.group_index(t, w.numel(), w.device)] != 0
        return alive & ~flagged

    def finish(self, t: int, w: Tensor, g: Tensor, alive: Tensor) -> None:
        """Write the new mask bits and this step's statistics: those of ``stats_mask``, 0 for the others."""
        if self.mask_words:
            self.mask_words[t].copy_(mask_format.pack(alive))
        bits = self.stats_mask
        if not self.stats or not bits:
            return
        stats = self.stats[t]
        zero = torch.zeros((), dtype=torch.float64, device=stats.device)
        w64, live = w.double().abs(), alive.double()
        values = [zero] * 5
        if bits & STATS_ALIVE:
            values[STAT_ALIVE] = live.sum()
        if bits & STATS_SUM_ABS_W:
            values[STAT_SUM_ABS_W] = (w64 * live).sum()
        if bits & STATS_SUM_KERNEL:  # at the scale temperature * mean |w| of the previous step
            prev_alive, prev_sum_w = float(stats[STAT_ALIVE]), float(stats[STAT_SUM_ABS_W])
            temperature = float(self.tensor_coefs[t][COEF_TEMPERATURE]) if self.tensor_coefs else 0.0
            tm = temperature * prev_sum_w / prev_alive if prev_alive > 0 else 0.0
            kernel = torch.exp(-w64.float() / tm).double() * live if tm > 0 else torch.zeros_like(w64)
            values[STAT_SUM_KERNEL], values[STAT_TM] = kernel.sum(), w64.new_tensor(tm)
        if bits & STATS_SUM_ABS_G:
            values[STAT_SUM_ABS_G] = (g.double().abs() * live).sum()
        stats.copy_(torch.stack(values))


def nm_keep(code: Tensor | float, w: Tensor, alive: Tensor, offset: int = 0) -> Tensor:
    """N:M decision (contract module docstring): the live elements of flat ``w`` that rank below ``N`` in their group.

    ``offset`` is the global index of ``w[0]`` (a shard's offset): it and ``w.numel()`` must be
    multiples of ``M`` so that no group is split.
    """
    n, m = nm_pattern(float(code))
    if offset % m or w.numel() % m:
        raise RuntimeError(
            f"prune='nm' with M={m} needs tensors (and shards) whose element count and offset are multiples of M; "
            f"got {w.numel()} elements at offset {offset}"
        )
    a, live = w.abs().view(-1, m), alive.view(-1, m)
    index = torch.arange(m, device=w.device)
    # beats[g, j, k]: live element k of group g outranks element j
    beats = (a.unsqueeze(1) > a.unsqueeze(2)) | ((a.unsqueeze(1) == a.unsqueeze(2)) & (index < index.unsqueeze(1)))
    rank = (beats & live.unsqueeze(1)).sum(-1)
    return alive & (rank < n).view(-1)


def _work(buffer: Tensor) -> Tensor:
    """The float32 working copy of an algorithm buffer: the buffer itself when it is float32."""
    return buffer.view(-1).float()


def _apply(pruning: _Pruning, t: int, param: Tensor, buffers: list[Tensor], update) -> None:
    """Run one tensor through mask, regularize, ``update``, proximal L1, decide, mask, stats.

    ``update(w, alive, work)`` reads and updates the float32 working copies ``work`` of ``buffers``
    in place; a 16-bit buffer is rounded once, when its working copy is stored back.
    """
    numel = param.numel()
    alive = pruning.alive(t, numel, param.device)
    w = param.detach().reshape(-1).float()
    work = [_work(b) for b in buffers]
    # elements dead before this step are not touched: they get back exactly what was read (as the
    # native and Triton drivers, which never read them, leave them)
    was_dead = ~alive
    any_dead = bool(was_dead.any())
    if any_dead:
        w_dead = w[was_dead].clone()
        states_dead = [state[was_dead].clone() for state in work]
    new_w, g_raw = update(w, alive, work)
    new_alive = pruning.decide(t, new_w, alive)
    dead = ~new_alive
    new_w = new_w.masked_fill(dead, 0.0)  # exactly +0.0, whatever the value (inf * 0 would be NaN, -w * 0 is -0.0)
    if any_dead:
        new_w[was_dead] = w_dead
    for i, (buffer, state) in enumerate(zip(buffers, work)):
        state.masked_fill_(dead, 0.0)
        if any_dead:
            state[was_dead] = states_dead[i]
        if state.data_ptr() != buffer.data_ptr():
            buffer.view(-1).copy_(state)
    param.detach().copy_(new_w.view_as(param).to(param.dtype))
    pruning.finish(t, new_w, g_raw, new_alive)


def _pruning(kw: dict, params: list[Tensor]) -> _Pruning:
    pruning = _Pruning(**{k: kw[k] for k in _Pruning.__dataclass_fields__ if k in kw})
    if pruning.prune == "nm":  # every tensor checked before any is modified
        check_nm(params, pruning.tensor_coefs, pruning.shard_offsets)
    return pruning


def check_nm(params: list[Tensor], tensor_coefs: list[Tensor], shard_offsets: list[int]) -> None:
    """Raise unless every tensor has an N:M pattern whose M divides its element count and shard offset."""
    codes = torch.stack([c[COEF_NM] for c in tensor_coefs]).tolist() if tensor_coefs else []
    for t, param in enumerate(params):
        _, m = nm_pattern(codes[t] if t < len(codes) else 0.0)
        offset = shard_offsets[t] if shard_offsets else 0
        if offset % m or param.numel() % m:
            raise RuntimeError(
                f"prune='nm' with M={m} needs tensors (and shards) whose element count and offset are multiples "
                f"of M; tensor {t} has {param.numel()} elements at offset {offset}"
            )


def _lr(lr: float, lr_tensor: Tensor | None) -> float | Tensor:
    return lr_tensor.float() if lr_tensor is not None else lr


def _skip(found_inf: Tensor | None) -> bool:
    return found_inf is not None and bool(found_inf.item())


def sgd_step(
    params,
    grads,
    momentum_buffers,
    steps,
    *,
    found_inf,
    lr,
    lr_tensor,
    weight_decay,
    momentum,
    dampening,
    nesterov,
    maximize,
    **pruning_kw,
) -> None:
    """Fused SGD step (torch.optim.SGD semantics) plus regularization, pruning and masks."""
    if _skip(found_inf):
        return
    pruning = _pruning(pruning_kw, params)
    lr = _lr(lr, lr_tensor)
    for t, (param, grad) in enumerate(zip(params, grads)):
        steps[t].add_(1)
        first = float(steps[t]) == 1.0

        def update(w: Tensor, alive: Tensor, work: list[Tensor], t=t, grad=grad, first=first):
            g_raw = grad.reshape(-1).float()
            g = -g_raw if maximize else g_raw
            w = w * alive
            if weight_decay != 0:
                g = g.add(w, alpha=weight_decay)
            g = g + pruning.regularization(t, w, g_raw) if (pruning.regularize or pruning.group_coefs) else g
            if momentum != 0:
                (buf,) = work
                if first:
                    buf.copy_(g)
                else:
                    buf.mul_(momentum).add_(g, alpha=1 - dampening)
                g = g.add(buf, alpha=momentum) if nesterov else buf
            w = w.add(g, alpha=-float(lr))  # torch.optim's add_(alpha=-lr), a tensor lr read as its value
            return pruning.proximal_l1(t, w, lr), g_raw

        _apply(pruning, t, param, [momentum_buffers[t]] if momentum != 0 else [], update)


def adam_step(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    steps,
    *,
    found_inf,
    lr,
    lr_tensor,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled,
    amsgrad,
    maximize,
    **pruning_kw,
) -> None:
    """Fused Adam / AdamW step (torch.optim semantics) plus regularization, pruning and masks."""
    if _skip(found_inf):
        return
    pruning = _pruning(pruning_kw, params)
    lr = _lr(lr, lr_tensor)
    for t, (param, grad) in enumerate(zip(params, grads)):
        steps[t].add_(1)
        step = float(steps[t])

        def update(w: Tensor, alive: Tensor, work: list[Tensor], t=t, grad=grad, step=step):
            g_raw = grad.reshape(-1).float()
            g = -g_raw if maximize else g_raw
            w = w * alive
            r = pruning.regularization(t, w, g_raw) if (pruning.regularize or pruning.group_coefs) else None
            if weight_decay != 0:
                if decoupled:
                    w = w * (1 - lr * weight_decay)
                else:
                    g = g.add(w, alpha=weight_decay)
            if r is not None:
                g = g + r
            exp_avg, exp_avg_sq = work[0], work[1]
            exp_avg.lerp_(g, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2_sqrt = math.sqrt(1 - beta2**step)
            if amsgrad:
                max_sq = work[2]
                torch.maximum(max_sq, exp_avg_sq, out=max_sq)
                denom = (max_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            else:
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            # torch.optim: step_size = lr / bias_correction1 (a float32 tensor when lr is one), read as a value
            w = w.addcdiv(exp_avg, denom, value=-float(lr / bias_correction1))
            return pruning.proximal_l1(t, w, lr), g_raw

        buffers = [exp_avgs[t], exp_avg_sqs[t]] + ([max_exp_avg_sqs[t]] if amsgrad else [])
        _apply(pruning, t, param, buffers, update)
