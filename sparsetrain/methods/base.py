"""The interface every method implements: a host-side schedule driving the fused step.

A method never loops over elements in Python. Before a step it writes per-tensor coefficients and
per-group values (device tensors in the optimizer state) and schedules a pruning decision; after a
step it may read a few scalars at its own intervals (GReg's magnitude ratio).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..pruner import Pruner, Target


class Method:
    """Base class. Subclasses set ``structure`` (None, "filters" or "channels") and override hooks."""

    structure: str | None = None
    uses_groups: bool = False
    target: float = 0.0

    def check(self, targets: list[Target]) -> None:
        """Raise a clear error before training if the method cannot handle ``targets``."""

    def attach(self, pruner: Pruner) -> None:
        """Called once, after masks exist: set coefficients, pick groups."""

    def before_step(self, pruner: Pruner, step: int) -> None:
        """Called before optimizer step ``step`` (0-based): schedule pruning, update coefficients."""

    def after_step(self, pruner: Pruner, step: int) -> None:
        """Called after optimizer step ``step``."""

    def scalars(self) -> dict[str, float]:
        """Method-specific scalars recorded in the history (e.g. GReg's lam)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def check_ratio(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value
