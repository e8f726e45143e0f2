"""Sparsity schedules: how much of a target is reached at a given step."""

from __future__ import annotations

from ..validation import integer

SCHEDULES = ("oneshot", "linear", "cubic")


def check_schedule(kind: str, start: int, end: int) -> None:
    """Raise ``ValueError`` for an unknown schedule kind or ``end <= start`` (``start < 0`` for any kind)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {SCHEDULES}")
    integer("start", start)
    integer("end", end)
    if start < 0 or (kind != "oneshot" and end <= start):
        raise ValueError(f"schedule needs 0 <= start < end, got start={start}, end={end}")


def sparsity_at(step: int, *, target: float, start: int, end: int, kind: str, initial: float = 0.0) -> float:
    """Target sparsity at ``step``: ``initial`` before ``start``, ``target`` from ``end`` on.

    With ``f = (step - start) / (end - start)``: ``linear`` is ``initial + (target - initial) * f``;
    ``cubic`` is Zhu & Gupta's ``target + (initial - target) * (1 - f)^3`` ("To prune, or not to
    prune", 2017), pruning fast early and slowly near the end; ``oneshot`` jumps to ``target`` at
    ``start``.

    Args:
        step: the optimizer step (0-based).
        target: sparsity reached at ``end``.
        start: first step of the schedule.
        end: step at which ``target`` is reached (ignored by ``oneshot``).
        kind: ``"oneshot"``, ``"linear"`` or ``"cubic"``.
        initial: sparsity before ``start`` (default ``0``).

    Returns:
        The scheduled sparsity, a float between ``initial`` and ``target``.
    """
    if step < start:
        return initial
    if kind == "oneshot" or step >= end:
        return target
    frac = (step - start) / (end - start)
    if kind == "linear":
        return initial + (target - initial) * frac
    return target + (initial - target) * (1.0 - frac) ** 3
