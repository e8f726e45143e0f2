"""SelectiveDecay: shrink irrelevant weights, then prune the small ones (Bonetta et al.).

Relevant weights take the ordinary update; irrelevant ones, whose gradient magnitude is small
relative to the tensor's mean |g| of the previous step, are shrunk by
``sd * w * max(0, 1 - |g| / (beta * gbar))`` inside the fused step. Every ``interval`` steps of
``[start, end]`` the alive weights below a per-layer magnitude threshold are pruned, the threshold
chosen so the layer reaches the schedule's sparsity (iteratively to the target).

The exact decay term is the project's own definition (closest verified code: LOBSTER).
"""

from __future__ import annotations

import math

from ..contract import COEF_THRESHOLD, STATS_ALIVE, STATS_NONE, STATS_SUM_ABS_G
from ..selection import kth_smallest_abs_many, next_float32, prune_count
from ..validation import integer, number
from .base import Method, check_ratio
from .schedules import check_schedule, sparsity_at


class SelectiveDecay(Method):
    """Selective weight decay of irrelevant weights, then iterative magnitude pruning.

    After Bonetta et al., "Regularization-based Pruning of Irrelevant Weights in Deep Neural
    Architectures" (2022). In every step, each weight ``w`` with gradient ``g`` gets the extra
    regularization gradient

        sd * w * max(0, 1 - |g| / (beta * gbar))

    inside the fused step, where ``gbar`` is the tensor's mean ``|g|`` over alive weights at the
    previous step: weights whose gradients are small relative to the tensor's (irrelevant ones)
    decay, relevant ones take the ordinary update. At the pruning events (every ``interval`` steps
    in ``(start, end]``) the alive weights below a per-layer magnitude threshold are pruned, the
    threshold chosen so the layer reaches ``sparsity_at(step) * target``.

    *This project's own definition:* the exact form of the decay term above (the paper's could not
    be verified; the closest verified code is LOBSTER's) and the threshold schedule.

    Args:
        target: fraction of each pruned tensor's weights pruned at ``end``, in ``[0, 1)``.
        sd: strength of the selective decay (default ``1e-3``; ``0`` turns it off).
        beta: relevance scale (default ``1.0``): a weight is irrelevant while ``|g| < beta * gbar``.
        start: the pruning phase starts after this step (default ``0``).
        end: last pruning event; the target is reached here (default ``1000``).
        interval: steps between pruning events (default ``50``).
        schedule: ``"linear"`` (default), ``"cubic"`` or ``"oneshot"``.

    Raises:
        ValueError: ``target`` outside ``[0, 1)``, an unknown schedule, ``end <= start``, ``sd < 0``,
            ``beta <= 0`` or ``interval < 1``.
    """

    def __init__(
        self,
        target: float,
        *,
        sd: float = 1e-3,
        beta: float = 1.0,
        start: int = 0,
        end: int = 1000,
        interval: int = 50,
        schedule: str = "linear",
    ) -> None:
        self.target = check_ratio("target", target)
        check_schedule(schedule, start, end)
        self.sd = number("sd", sd, low=0.0)
        self.beta = number("beta", beta, low=0.0, strict_low=True)
        self.interval = integer("interval", interval, low=1)
        self.start, self.end, self.schedule = start, end, schedule

    def attach(self, pruner) -> None:
        """Write ``sd`` and ``beta`` into every pruned tensor's coefficients."""
        for t in pruner.targets:
            pruner.optimizer.set_coefs(t.param, sd=self.sd, sd_beta=self.beta)

    def stats_read(self, step: int) -> int:
        """The decay term reads the previous step's mean |g| (|g| sum over alive count) at every step;
        never the |w| or kernel sums (the pruning threshold comes from the weights themselves)."""
        return STATS_ALIVE | STATS_SUM_ABS_G if self.sd > 0 else STATS_NONE

    def before_step(self, pruner, step: int) -> None:
        """At an event: set each tensor's magnitude threshold and schedule a ``"low"`` decision."""
        if not (self.start < step <= self.end and (step - self.start) % self.interval == 0):
            return
        level = sparsity_at(step, target=1.0, start=self.start, end=self.end, kind=self.schedule)
        counts = [prune_count(level * t.ratio, t.param.numel()) for t in pruner.targets]
        chosen = [(t, k) for t, k in zip(pruner.targets, counts) if k]
        values = kth_smallest_abs_many(
            [[pruner.weight(t.param)] for t, _ in chosen], [k for _, k in chosen], sync=pruner.sync
        )
        kth = {t.name: v for (t, _), v in zip(chosen, values)}
        for t in pruner.targets:
            pruner.coefs(t)[COEF_THRESHOLD] = next_float32(kth[t.name], math.inf) if t.name in kth else 0.0
        pruner.optimizer.schedule_pruning("low")
