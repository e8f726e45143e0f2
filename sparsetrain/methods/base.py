"""The interface every method implements: a host-side schedule driving the fused step.

A method never loops over elements in Python. Before a step it writes per-tensor coefficients and
per-group values (device tensors in the optimizer state) and schedules a pruning decision; after a
step it may read a few scalars at its own intervals (GReg's magnitude ratio).
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..coupled import CoupledGroups
    from ..pruner import Pruner, Target


class Method:
    """Base class of the pruning methods: a host-side schedule that drives the fused step.

    A method never loops over elements in Python. The :class:`~sparsetrain.Pruner` calls its hooks:
    :meth:`check` and :meth:`attach` once, :meth:`before_step` / :meth:`after_step` around every
    optimizer step. Before a step a method writes per-tensor coefficients
    (``pruner.optimizer.set_coefs``, ``pruner.coefs(target)``) and per-group values
    (``pruner.group_coefs(target)``) into the optimizer state, and may schedule a pruning decision
    (``pruner.optimizer.schedule_pruning(mode)``, mode ``"stochastic"``, ``"low"``, ``"high"``,
    ``"group"`` or ``"nm"``); the fused op does the rest on the device.

    Attributes:
        structure: ``None`` (unstructured), ``"filters"`` (output rows / filters) or ``"channels"``
            (input channels): the group layout of the pruned tensors.
        uses_groups: whether the method writes per-group tables (the op then reads them).
        target: the default target ratio of every pruned tensor.
    """

    structure: str | None = None
    uses_groups: bool = False
    target: float = 0.0

    def check(self, targets: list[Target]) -> None:
        """Raise a clear error before training if the method cannot handle ``targets``."""

    def check_groups(self, groups: CoupledGroups) -> None:
        """Raise a clear error before training if the method cannot prune these channel groups."""

    def attach(self, pruner: Pruner) -> None:
        """Called once, after masks exist: set coefficients, pick groups."""

    def before_step(self, pruner: Pruner, step: int) -> None:
        """Called before optimizer step ``step`` (0-based): schedule pruning, update coefficients."""

    def after_step(self, pruner: Pruner, step: int) -> None:
        """Called after optimizer step ``step``."""

    def stats_read(self, step: int) -> int:
        """Which of the previous step's statistics step ``step`` reads: a bit set of
        ``sparsetrain.contract.STATS_*`` (0: none).

        Statistics only when consumed: optimizer step ``k`` computes exactly ``stats_read(k + 1)`` (with
        the alive count and |g| sum on every step under selective decay), the others are stored as 0
        and none at all when that is 0; step ``k`` itself reads the previous step's. A step that
        computes the kernel sum (``STATS_SUM_KERNEL``) reads the previous step's alive count and |w|
        sum (its scale ``temperature * mean|w|``), so a method that reads the kernel sum at step
        ``s`` also declares ``STATS_ALIVE | STATS_SUM_ABS_W`` at ``s - 1``.

        Default: every statistic when :meth:`needs_stats` says ``step`` reads any, none otherwise (a
        method that only overrides :meth:`needs_stats` keeps all of them computed).
        """
        from ..contract import STATS_ALL, STATS_NONE

        return STATS_ALL if self.needs_stats(step) else STATS_NONE

    def needs_stats(self, step: int) -> bool:
        """Whether step ``step`` reads any of the previous step's statistics.

        For sharded (FSDP2) parameters, statistics are summed across ranks before such a step and never
        otherwise. Default: whether :meth:`stats_read` names any, for a method that overrides it;
        ``False`` otherwise. Override one of the two (:meth:`stats_read` says which statistics).
        """
        if type(self).stats_read is not Method.stats_read:
            return bool(self.stats_read(step))
        return False

    def units_removed(self, pruner: Pruner, removed: dict[str, list[int]]) -> None:
        """Called after :func:`sparsetrain.shrink.shrink` removed channels (per group name, old indices):
        renumber any per-channel state the method keeps."""

    def scalars(self) -> dict[str, float]:
        """Method-specific scalars recorded in the history (e.g. GReg's lam)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The method's schedule state (plain Python values and small tensors), for resuming."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def remember_initial_state(self) -> None:
        """Keep a copy of the schedule's state as it is before any Pruner drove this object (the
        first call keeps it; later calls do nothing). The :class:`~sparsetrain.Pruner` calls it."""
        if "_initial_state" not in self.__dict__:
            self.__dict__["_initial_state"] = copy.deepcopy(self.state_dict())

    def restart(self) -> None:
        """Return the schedule's state (:meth:`state_dict`) to the one kept by :meth:`remember_initial_state`.

        A Pruner that starts a schedule (no saved one to continue) calls it before :meth:`attach`, so
        a method object attached again after the previous Pruner's ``remove()`` starts afresh, as a
        new object would, instead of continuing where the old schedule stopped.
        """
        initial = self.__dict__.get("_initial_state")
        if initial is not None:
            self.load_state_dict(copy.deepcopy(initial))


def warn_if_sparser(targets: list[Target]) -> None:
    """Warn about targets already sparser than their ratio (their zeros stay; nothing more is pruned
    there). Not an error: a model resumed from a checkpoint is often just above its target."""
    for t in targets:
        sparsity = float((t.param.detach() == 0).float().mean())
        if sparsity > t.ratio:
            warnings.warn(
                f"{t.name} is already {sparsity:.1%} sparse, above its target {t.ratio:.1%}; its zeros stay",
                stacklevel=3,
            )


def check_ratio(name: str, value: float) -> float:
    """``value`` as a float; ``TypeError`` for a non-number, ``ValueError`` outside ``[0, 1)``, naming ``name``."""
    from ..validation import number

    value = number(name, value, finite=False)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value
