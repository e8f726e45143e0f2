"""StochasticMagnitude: sample weights to prune with a probability that favours small magnitudes.

After every ``interval``-th optimizer step of the pruning phase ``[start, end]``, each alive weight
is zeroed with probability ``q = min(1, c * exp(-|w| / (T * m)))``: ``m`` is the mean |w| over alive
weights, ``T`` the temperature, and ``c`` is calibrated from the previous step's statistics so
that the expected number pruned at the event brings the tensor to the schedule's sparsity
(linear or cubic, to ``target``). Used with L2 or L1 weight decay (``l2``, ``l1`` here are
regularization coefficients applied in the same fused pass; the optimizer's own ``weight_decay``
works too). Node pruning is emergent: a node is dead when all its incoming weights are zero.

The source paper's exact probability function was not available; this family is the project's
own definition (docs/design.md, "Methods, as this project defines them").
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from .. import scan
from ..contract import (
    COEF_PRUNE_COUNT,
    NUM_STATS,
    STAT_ALIVE,
    STATS_ALIVE,
    STATS_NONE,
    STATS_SUM_ABS_W,
    STATS_SUM_KERNEL,
)
from ..validation import integer, number
from .base import Method, check_ratio, warn_if_sparser
from .schedules import check_schedule, sparsity_at

_STATS, _COEFS = operator.itemgetter("stats"), operator.itemgetter("coefs")


class StochasticMagnitude(Method):
    """Stochastic magnitude pruning: sample weights to prune, favouring small magnitudes.

    After Ben-Guigui, Goldberger and Riklin-Raviv, "The Role of Regularization in Shaping Weight
    and Node Pruning Dependency and Dynamics" (arXiv:2012.03827): weights are pruned by sampling
    while training with L1 or L2 decay, and the decay shapes which nodes die.

    At each pruning event (steps ``start, start + interval, ...`` up to ``end``), every alive weight
    ``w`` of a pruned tensor is zeroed with probability

        q = min(1, c * exp(-|w| / (temperature * m)))

    on the *updated* weight, where ``m`` is the tensor's mean ``|w|`` over alive weights at the
    previous step and ``c`` is calibrated from the previous step's statistics so that the expected
    number pruned brings the tensor to the schedule's sparsity ``sparsity_at(step) * target``
    (:func:`~sparsetrain.methods.sparsity_at`). The draw ``u`` comes from the shared Philox stream,
    so the masks are the same on every backend for a given optimizer ``seed``.

    *This project's own definition:* the source paper's exact probability function was not
    available, so the exponential kernel, the temperature and the calibration of ``c`` to a
    sparsity schedule are defined here, not taken from the paper.

    Args:
        target: fraction of each pruned tensor's weights pruned at ``end``, in ``[0, 1)``
            (``Pruner(ratios=...)`` overrides it per layer).
        start: first step of the pruning phase (default ``1``; at least 1, since the first event
            needs one step's statistics).
        end: last step of the pruning phase (default ``1000``); the target is reached here.
        schedule: ``"cubic"`` (default; fast early, slow near ``end``), ``"linear"`` or ``"oneshot"``.
        interval: steps between pruning events (default ``1``: every step).
        temperature: ``T`` above (default ``1.0``); smaller values prune almost only the smallest
            weights.
        l2: L2 coefficient applied to the pruned tensors in the fused step (default ``0``); the
            optimizer's ``weight_decay`` applies too.
        l1: L1 coefficient applied to the pruned tensors (default ``0``), as a proximal step
            unless the optimizer has ``l1_proximal=False``.

    Raises:
        ValueError: ``target`` outside ``[0, 1)``, an unknown schedule, ``start < 1``,
            ``end <= start``, ``interval < 1`` or ``temperature <= 0``; at ``Pruner`` creation, a
            tensor already sparser than its target.

    Example:
        ```python
        method = StochasticMagnitude(target=0.9, start=500, end=5000, interval=5, temperature=0.1, l1=1e-4)
        pruner = sparsetrain.Pruner(model, sparsetrain.optim.SGD(model.parameters(), lr=0.1), method)
        ```
    """

    def __init__(
        self,
        target: float,
        *,
        start: int = 1,
        end: int = 1000,
        schedule: str = "cubic",
        interval: int = 1,
        temperature: float = 1.0,
        l2: float = 0.0,
        l1: float = 0.0,
    ) -> None:
        self.target = check_ratio("target", target)
        check_schedule(schedule, start, end)
        if start < 1:
            raise ValueError("start must be >= 1: the first event needs one step's statistics")
        self.start, self.end, self.schedule = start, end, schedule
        self.interval = integer("interval", interval, low=1)
        self.temperature = number("temperature", temperature, low=0.0, strict_low=True)
        self.l2, self.l1 = number("l2", l2, low=0.0), number("l1", l1, low=0.0)

    def check(self, targets) -> None:
        """Warn about a tensor already sparser than its target (its zeros stay; nothing more is pruned)."""
        warn_if_sparser(targets)

    def attach(self, pruner) -> None:
        """Write the temperature and the ``l2`` / ``l1`` coefficients of every pruned tensor."""
        for target in pruner.targets:
            pruner.optimizer.set_coefs(target.param, temperature=self.temperature, l2=self.l2, l1=self.l1)

    def is_event(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) takes a sampling decision."""
        return self.start <= step <= self.end and (step - self.start) % self.interval == 0

    def stats_read(self, step: int) -> int:
        """An event reads the previous step's alive count (its prune count) and kernel sum (with its
        scale ``STAT_TM``); the step before an event computes that kernel sum at the scale ``T * m`` of
        the step before it, so it reads that step's alive count and |w| sum. Never the |g| sum."""
        bits = STATS_NONE
        if self.is_event(step):
            bits |= STATS_ALIVE | STATS_SUM_KERNEL
        if self.is_event(step + 1):
            bits |= STATS_ALIVE | STATS_SUM_ABS_W
        return bits

    def level(self, step: int) -> float:
        """Fraction of each target's ratio scheduled at ``step``."""
        return sparsity_at(step, target=1.0, start=self.start, end=self.end, kind=self.schedule)

    def before_step(self, pruner, step: int) -> None:
        """At an event: set each tensor's expected prune count (on the device) and schedule sampling.

        expected count = wanted dead - already dead = alive - (numel - level * ratio * numel), clamped
        at 0, from the statistics: a few batched device operations per device for all tensors (the
        per-tensor views are kept while the optimizer's statistics and coefficient tensors stay, see
        :meth:`_views`).
        """
        if not self.is_event(step):
            return
        level = self.level(step)
        targets = pruner.targets
        if not targets:
            pruner.optimizer.schedule_pruning("stochastic")
            return
        pruner.stats(targets[0])  # sharded parameters: the statistics summed across ranks first
        for views in self._views(pruner.optimizer, targets):
            # n - level * ratio * n, evaluated as written, in a work vector kept with the views
            if views["ratio"] is not None:  # one ratio for all: level * ratio is the same double on the host
                keep = torch.mul(views["numels"], level * views["ratio"], out=views["work"])
            else:
                keep = torch.mul(views["ratios"], level, out=views["work"]).mul_(views["numels"])
            torch.sub(views["numels"], keep, out=keep)
            alive = views["alive_values"]
            if not scan.gather_elements(alive, views["alive"]):  # CPU tensors: plain loads in C++
                stats = views["stats"]  # whole vectors: one cat, no per-tensor view (when all have NUM_STATS)
                if stats:
                    alive = torch.cat(stats).view(len(stats), NUM_STATS)[:, STAT_ALIVE]
                else:
                    alive = torch.stack(views["alive"])
            views["buffer"].copy_(torch.sub(alive, keep, out=keep).clamp_(min=0))
            scan.copy_elements(views["counts"], views["buffer"], views["items"])
        pruner.optimizer.schedule_pruning("stochastic")

    def _views(self, optimizer: Any, targets: list[Any]) -> list[dict[str, Any]]:
        """Per device: the alive-count and prune-count scalar views of the targets' statistics and
        coefficients, their numels and ratios (float64 on the device), and a float32 buffer with its
        per-tensor views (the counts' source).

        Cached while the targets (the same objects, ratios unchanged), the optimizer's ``state``, its
        ``state_version`` (bumped whenever it replaces state tensors or reshapes parameters) and each
        target's ``stats`` and ``coefs`` tensors (also when replaced by hand) stay the same: an event
        then makes no per-tensor state lookup on the host (a lookup by tensor costs its Python hash),
        and checks the rest in a few C passes over the lists (:mod:`sparsetrain.scan`).
        """
        state, version = optimizer.state, getattr(optimizer, "state_version", None)
        cached = getattr(self, "_view_cache", None)
        if (
            version is not None
            and cached is not None
            and cached["version"] == version
            and cached["state"] is state
            and len(targets) == len(cached["targets"])
            and all(map(operator.is_, targets, cached["targets"]))
            and scan.attrs_equal(targets, "ratio", cached["ratios"])
            and scan.items_are(cached["dicts"], "stats", cached["stats"])
            and scan.items_are(cached["dicts"], "coefs", cached["coefs"])
        ):
            return cached["views"]
        dicts = [state[target.param] for target in targets]
        by_device: dict[torch.device, dict[str, list]] = {}
        for target, entries in zip(targets, dicts):
            stats, coefs = entries["stats"], entries["coefs"]
            views = by_device.setdefault(
                stats.device, {"alive": [], "stats": [], "counts": [], "numels": [], "ratios": []}
            )
            views["alive"].append(stats[STAT_ALIVE])
            views["stats"].append(stats)
            views["counts"].append(coefs[COEF_PRUNE_COUNT])
            views["numels"].append(target.param.numel())
            views["ratios"].append(target.ratio)
        for device, views in by_device.items():
            if not all(s.shape == (NUM_STATS,) and s.dtype == torch.float64 for s in views["stats"]):
                views["stats"] = []  # not the vectors the optimizer makes: the alive counts are stacked one by one
            views["numels"] = torch.tensor(views["numels"], dtype=torch.float64, device=device)
            ratios = set(views["ratios"])
            views["ratio"] = float(next(iter(ratios))) if len(ratios) == 1 else None
            views["ratios"] = torch.tensor(views["ratios"], dtype=torch.float64, device=device)
            views["buffer"] = torch.zeros(len(views["alive"]), dtype=views["counts"][0].dtype, device=device)
            views["items"] = list(views["buffer"].unbind())
            views["alive_values"] = torch.zeros(len(views["alive"]), dtype=views["alive"][0].dtype, device=device)
            views["work"] = torch.zeros(len(views["alive"]), dtype=torch.float64, device=device)
        self._view_cache = {
            "version": version,
            "state": state,
            "targets": list(targets),  # a copy (the list may change in place), which keeps the objects alive
            "ratios": [target.ratio for target in targets],
            "dicts": dicts,
            "stats": list(map(_STATS, dicts)),
            "coefs": list(map(_COEFS, dicts)),
            "views": list(by_device.values()),
        }
        return self._view_cache["views"]

    def state_dict(self) -> dict[str, Any]:
        """The schedule's bounds (the method keeps no other state; the stream's state is the optimizer's)."""
        return {"start": self.start, "end": self.end}
