"""Pruning events as promises: every masked tensor gets the decision of an event.

A pruning event scheduled for a step (:meth:`FusedOptimizer.schedule_pruning`) is kept by every
masked tensor of the optimizer:

* tensors with a gradient on that step decide inside the fused step, on their updated weights;
* tensors without a gradient on that step (a frozen layer, a head not used in this batch) decide
  on that same step, on their current weights, with the same rule, thresholds and random stream
  (:func:`decide_without_gradient`); their weights and optimizer states are masked, nothing else
  of them changes (no update, no step count), and their statistics are refreshed;
* a step skipped because a gradient is not finite (``skip_nonfinite=True``) changes nothing: the
  event stays pending and is taken by the next step that runs, with the event counter, the
  pruner's step count and the method's schedule unchanged;
* compiled steps run the same step (see :mod:`sparsetrain.optim.compiled`), so they take every
  event on the step it is scheduled for;
* an event step is not captured in a CUDA graph (:func:`refuse_capture`): it raises before anything
  changes, and the event stays pending.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .. import philox
from ..backends import torch_ref
from ..contract import STATS_ALL
from ..transfer import to_device

if TYPE_CHECKING:
    from .base import FusedOptimizer


def refuse_capture(prune: str) -> None:
    """Raise before anything changes when a pruning event would be captured in a CUDA graph.

    An event's seeds, its decision rule and the event counter are chosen on the host for that one
    step; a graph replays its captured kernels with their captured arguments, so every replay would
    repeat the same decision with the same random numbers. Capture non-event steps; take events
    eagerly (between replays).
    """
    if prune != "none" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"a pruning event ({prune!r}) is scheduled for this step, which is being captured in a CUDA graph: "
            "its seeds and decision are chosen on the host for this step only, so every replay would repeat "
            "them; run event steps outside the graph (capture non-event steps only)"
        )


def decide_without_gradient(opt: FusedOptimizer, prune: str, stats_mask: int = STATS_ALL) -> None:
    """Apply the pending decision ``prune`` to every masked parameter that has no gradient now; their
    statistics as the step's (``stats_mask``, its ``contract.STATS_*`` bits; a zero gradient)."""
    index = opt._param_index()
    waiting = [
        p for g in opt.param_groups for p in g["params"] if p.grad is None and "mask_words" in opt.state.get(p, {})
    ]
    if not waiting:
        return
    states = [opt.state[p] for p in waiting]
    device = waiting[0].device
    if prune == "stochastic":
        indices = np.array([index[p] for p in waiting], dtype=np.int64)
        seeds = to_device(philox.event_seeds(opt.base_seed, indices, opt.prune_events), torch.int64, device)
    else:
        seeds = torch.zeros(0, dtype=torch.int64, device=device)
    pruning = torch_ref._Pruning(
        mask_words=[s["mask_words"] for s in states],
        stats=[s["stats"] for s in states],
        tensor_coefs=[s["coefs"] for s in states],
        group_coefs=[s["group_coefs"] for s in states] if opt.uses_groups else [],
        group_inner=[s["group_inner"] for s in states] if opt.uses_groups else [],
        shard_offsets=[],
        seeds=seeds,
        prune=prune,
        regularize=False,
        l1_proximal=opt.l1_proximal,
        stats_mask=stats_mask,
    )
    for t, (p, state) in enumerate(zip(waiting, states)):
        numel = p.numel()
        alive = pruning.alive(t, numel, p.device)
        w = p.detach().reshape(-1).float()
        new_alive = pruning.decide(t, w, alive)
        keep = new_alive.reshape(p.shape)
        p.mul_(keep)
        for value in state.values():
            if isinstance(value, Tensor) and value.shape == p.shape:
                value.mul_(keep)
        pruning.finish(t, w * new_alive, torch.zeros_like(w), new_alive)
