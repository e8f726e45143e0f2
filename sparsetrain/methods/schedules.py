"""Sparsity schedules: how much of a target is reached at a given step."""

from __future__ import annotations

from ..validation import integer

SCHEDULES = ("oneshot", "linear", "cubic")


def check_schedule(kind: str, start: int, end: int) -> None:
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {SCHEDULES}")
    integer("start", start)
    integer("end", end)
    if start < 0 or (kind != "oneshot" and end <= start):
        raise ValueError(f"schedule needs 0 <= start < end, got start={start}, end={end}")


def sparsity_at(step: int, *, target: float, start: int, end: int, kind: str, initial: float = 0.0) -> float:
    """Target sparsity at ``step``: ``initial`` before ``start``, ``target`` from ``end`` on.

    ``linear`` interpolates; ``cubic`` is Zhu & Gupta's ``target + (initial - target)(1 - f)^3``,
    pruning fast early and slowly near the end; ``oneshot`` jumps to ``target`` at ``start``.
    """
    if step < start:
        return initial
    if kind == "oneshot" or step >= end:
        return target
    frac = (step - start) / (end - start)
    if kind == "linear":
        return initial + (target - initial) * frac
    return target + (initial - target) * (1.0 - frac) ** 3
