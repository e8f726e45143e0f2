"""Magnitude pruning: the k smallest (or, with ``largest=True``, largest) weights or groups.

Scope per layer or global; unstructured, or channel groups (:mod:`sparsetrain.coupled`: each
output channel with every slice that goes with it) scored by the L1 or L2 norm of all their
member slices; one-shot or iterative on a linear or cubic schedule. One-shot pruning selects on the
current weights and applies the masks at once, exactly as ``torch.nn.utils.prune`` selects
(``l1_unstructured``, ``global_unstructured`` with ``L1Unstructured``, and, with the Pruner's
``coupled=False``, ``ln_structured`` on dim 0).
Iterative events compute thresholds (a global one by radix select, never by sorting everything)
and hand the decision to the fused step, on the updated weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import masks as mask_format
from ..contract import COEF_THRESHOLD, GROUP_PRUNE
from ..distributed import full, local
from ..selection import kth_smallest_abs_many, next_float32, prune_count
from ..validation import integer, number
from .base import Method, check_ratio, warn_if_sparser
from .greg import check_structure
from .schedules import check_schedule, sparsity_at


class Magnitude(Method):
    """Magnitude pruning: the smallest (or largest) weights or groups, one-shot or on a schedule.

    Classic magnitude pruning, and with ``largest=True`` the pruning of *large* weights studied by
    Bartoldson et al., "Enhancing the Regularization Effect of Weight Pruning in Artificial Neural
    Networks" (2018). At each pruning event the ``k`` smallest (or largest) alive weights of a
    layer, or of all pruned layers together (``scope="global"``), or the ``k`` groups of smallest
    L1 / L2 norm (``structure``), are pruned, with ``k`` set by the schedule:
    ``k = round(sparsity_at(step) * target * size)``.

    One-shot pruning (``schedule="oneshot"``) selects on the current weights and masks at once,
    exactly as ``torch.nn.utils.prune`` selects (``l1_unstructured``, ``global_unstructured``
    with ``L1Unstructured`` and, with the Pruner's ``coupled=False``, ``ln_structured`` on dim 0);
    with ``start=0`` it happens when the ``Pruner`` is created. Iterative events compute
    thresholds on the host (a global one by a multi-tensor radix select, never by sorting all
    weights) and leave the decision to the fused step, on the updated weights.

    Args:
        target: fraction pruned at the end, in ``[0, 1)``: per layer, or over all pruned weights
            with ``scope="global"``.
        largest: prune the largest magnitudes instead of the smallest (default ``False``;
            unstructured only).
        scope: ``"layer"`` (default; each layer to its own target) or ``"global"`` (one threshold
            over all pruned weights; unstructured only).
        structure: ``None`` (default, unstructured), ``"filters"`` (or its alias ``"neurons"``:
            output channels / features, pruned as coupled channel groups with every slice that goes
            with them) or ``"channels"`` (input channels).
        norm: the group norm's order for structured pruning (default ``1.0``: L1; ``2.0``: L2).
        schedule: ``"oneshot"`` (default), ``"linear"`` or ``"cubic"``.
        start: step of the one-shot event, or first step of the schedule (default ``0``).
        end: step at which an iterative schedule reaches ``target`` (default ``0``; must be
            ``> start`` for ``"linear"`` / ``"cubic"``).
        interval: steps between iterative events (default ``100``; at least 1).

    Raises:
        ValueError: ``target`` outside ``[0, 1)``, an unknown ``scope`` or schedule, structured
            pruning with ``scope="global"`` or ``largest=True``, ``end <= start`` for an iterative
            schedule; at ``Pruner`` creation, an unstructured tensor already sparser than its
            target.

    Example:
        ```python
        methods.Magnitude(0.5)                                        # one-shot, per layer, now
        methods.Magnitude(0.9, scope="global", schedule="cubic", start=1000, end=20_000, interval=500)
        methods.Magnitude(0.3, structure="filters", norm=2.0)        # one-shot L2 filter pruning
        ```
    """

    def __init__(
        self,
        target: float,
        *,
        largest: bool = False,
        scope: str = "layer",
        structure: str | None = None,
        norm: float = 1.0,
        schedule: str = "oneshot",
        start: int = 0,
        end: int = 0,
        interval: int = 100,
    ) -> None:
        self.target = check_ratio("target", target)
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        if structure is not None and scope == "global":
            raise ValueError("structured magnitude pruning is per layer (scope='layer')")
        if largest and structure is not None:
            raise ValueError("largest=True is defined for unstructured pruning")
        check_schedule(schedule, start, end)
        if structure is not None:
            structure = check_structure(structure, "Magnitude")
        self.largest, self.scope, self.structure = largest, scope, structure
        self.norm = number("norm", norm, low=0.0, strict_low=True, finite=False)
        self.schedule, self.start, self.end = schedule, start, end
        self.interval = integer("interval", interval, low=1)
        self.uses_groups = structure is not None
        self.events_done = 0

    def check(self, targets) -> None:
        if self.structure is None and self.scope == "layer":
            warn_if_sparser(targets)

    def check_groups(self, groups) -> None:
        if self.structure is not None:
            for g in groups.groups:
                k = prune_count(g.ratio, g.size)
                if k >= g.size:
                    raise ValueError(
                        f"target {g.ratio} would remove all {g.size} channels of layer {g.name!r} (and every layer "
                        f"coupled to it: {', '.join(g.modules())}); lower it (ratios={{{g.name!r}: ...}}) or "
                        f"exclude it (exclude=[{g.name!r}])"
                    )

    def attach(self, pruner) -> None:
        if self.schedule == "oneshot" and self.start == 0:
            self.prune_now(pruner, 1.0)

    def level(self, step: int) -> float:
        return sparsity_at(step, target=1.0, start=self.start, end=self.end, kind=self.schedule)

    # ---------------------------------------------------------------- one-shot (exact selection)
    def prune_now(self, pruner, level: float) -> None:
        """Select on the current weights and apply the masks immediately."""
        if self.structure is not None:
            pruner.set_group_alive([flags == 0 for flags in self._group_flags(pruner, level)])
        elif self.scope == "layer":
            for t in pruner.targets:
                k = prune_count(level * t.ratio, t.param.numel())
                alive = torch.ones(t.param.numel(), dtype=torch.bool, device=t.param.device)
                if k:  # one-shot, exact ties as torch.nn.utils.prune: a sharded weight is gathered once
                    magnitudes = full(pruner.weight(t.param)).detach().abs().reshape(-1)
                    alive[torch.topk(magnitudes, k, largest=self.largest).indices] = False
                pruner.optimizer.set_mask(t.param, alive.reshape(t.param.shape))
        else:
            tensors = [pruner.weight(t.param) for t in pruner.targets]
            total = sum(x.numel() for x in tensors)
            k = prune_count(level * self.target, total)
            if k:
                threshold = self._global_threshold(tensors, k, total, pruner.sync)
                for t in pruner.targets:
                    magnitudes = t.param.detach().abs()
                    dead = magnitudes > threshold if self.largest else magnitudes < threshold
                    pruner.optimizer.set_mask(t.param, ~dead)
        self.events_done += 1

    def _dead(self, pruner, targets) -> torch.Tensor:
        """With ``largest=True``, the weights already pruned: they are zeros now, below every alive one,
        so an event prunes only the rest of its count among the alive (smallest-first needs no such
        correction: the dead zeros are the first of its count). The local count (a DTensor's shard),
        summed across ranks in the selection's one collective."""
        dead = sum(
            local(t.param).numel() - mask_format.alive_count(pruner.optimizer.state[t.param]["mask_words"])
            for t in targets
        )
        return torch.tensor(float(dead), dtype=torch.float64)

    def _group_flags(self, pruner, level: float) -> list[torch.Tensor]:
        """Per channel group, 1.0 on the ``level * ratio`` channels of smallest group norm."""
        out = []
        for g, scores in zip(pruner.groups.groups, pruner.group_scores(self.norm)):
            # counts of the original size; channels a shrink removed were the first of them
            k = max(prune_count(level * g.ratio, g.size + g.removed) - g.removed, 0)
            flags = torch.zeros_like(scores)
            if k:
                flags[torch.topk(scores, k, largest=False).indices] = 1.0
            out.append(flags)
        return out

    def _global_threshold(self, tensors, k: int, total: int, sync=None) -> float:
        """Strict threshold t: ``|w| < t`` selects the k smallest (``|w| > t`` the k largest) absent ties."""
        return self._thresholds([tensors], [k], [total], sync)[0]

    def _thresholds(self, selections, ks, totals, sync, dead=None) -> list[float]:
        """:meth:`_global_threshold` of several selections with one radix select (one collective with
        shards). ``dead`` (``largest=True``): per selection, the local count already pruned (:meth:`_dead`);
        a selection with nothing left to prune gets ``inf``."""
        if self.largest:
            values = kth_smallest_abs_many(
                selections, [n - k + 1 for k, n in zip(ks, totals)], sync=sync, k_offsets=dead
            )
            return [math.inf if v is None else next_float32(v, 0.0) for v in values]
        return [next_float32(v, math.inf) for v in kth_smallest_abs_many(selections, ks, sync=sync)]

    # ---------------------------------------------------------------- iterative (fused decision)
    def before_step(self, pruner, step: int) -> None:
        if self.schedule == "oneshot":
            if step == self.start and self.start > 0:
                self.prune_now(pruner, 1.0)
            return
        if not (self.start <= step <= self.end and (step - self.start) % self.interval == 0):
            return
        level = self.level(step)
        opt = pruner.optimizer
        if self.structure is not None:
            pruner.write_group_rows(GROUP_PRUNE, self._group_flags(pruner, level), "max")
            opt.schedule_pruning("group")
        else:
            if self.scope == "global":
                tensors = [pruner.weight(t.param) for t in pruner.targets]
                total = sum(x.numel() for x in tensors)
                k = prune_count(level * self.target, total)
                if self.largest:
                    dead = [self._dead(pruner, pruner.targets)]
                    threshold = self._thresholds([tensors], [k], [total], pruner.sync, dead)[0]
                else:
                    threshold = self._global_threshold(tensors, k, total, pruner.sync) if k > 0 else 0.0
                thresholds = [threshold] * len(pruner.targets)
            else:
                counts = [prune_count(level * t.ratio, t.param.numel()) for t in pruner.targets]
                chosen = [(t, k) for t, k in zip(pruner.targets, counts) if k]
                values = self._thresholds(
                    [[pruner.weight(t.param)] for t, _ in chosen],
                    [k for _, k in chosen],
                    [t.param.numel() for t, _ in chosen],
                    pruner.sync,
                    [self._dead(pruner, [t]) for t, _ in chosen] if self.largest else None,
                )
                found = {t.name: v for (t, _), v in zip(chosen, values)}
                thresholds = [found.get(t.name, math.inf if self.largest else 0.0) for t in pruner.targets]
            for t, threshold in zip(pruner.targets, thresholds):
                pruner.coefs(t)[COEF_THRESHOLD] = threshold
            opt.schedule_pruning("high" if self.largest else "low")
        self.events_done += 1

    def state_dict(self) -> dict[str, Any]:
        return {"events_done": self.events_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events_done = state["events_done"]
