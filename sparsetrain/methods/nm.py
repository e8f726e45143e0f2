"""N:M sparsity: of every M consecutive weights along the input dimension, the N largest stay."""

from __future__ import annotations

from typing import Any

from .. import contract
from ..validation import integer
from .base import Method


class NM(Method):
    """N:M semi-structured sparsity (2:4 by default), decided in the fused step on every backend.

    Each pruned weight is viewed as ``[out, in * ...]`` (a Linear's ``[out, in]``, a convolution's
    ``[out, in * kh * kw]``) and its rows are cut into groups of ``m`` consecutive elements along
    the last dimension; at step ``start`` the fused step keeps, of every group, the ``n`` live weights
    of largest ``|w|`` after that step's update (ties go to the lower index) and prunes the rest. Dead
    weights never come back and are never counted, so a group keeps ``min(n, live)`` weights: exactly
    ``n`` of every ``m`` in a tensor that was dense. Later steps keep the masks (the pattern holds
    for the rest of training). The exact rule is in :mod:`sparsetrain.contract`.

    On GPUs with semi-structured sparse support, Linear layers pruned 2:4 can then run through
    :func:`sparsetrain.nm.to_semi_structured`.

    Args:
        n: weights kept per group (``1 <= n < m``; default 2).
        m: group size, one of 2, 4, 8, 16, 32 (default 4).
        start: the optimizer step (0-based) that takes the decision (default 0: the first step).

    Raises:
        ValueError: ``n`` or ``m`` out of range; at ``Pruner`` creation, a pruned weight whose row
            length (``numel / shape[0]``) is not a multiple of ``m``.

    Example:
        ```python
        Pruner(model, optimizer, methods.NM(2, 4))              # 2:4 at the first step
        Pruner(model, optimizer, methods.NM(1, 4, start=500))   # 1:4 after 500 dense steps
        ```
    """

    def __init__(self, n: int = 2, m: int = 4, *, start: int = 0) -> None:
        self.code = contract.nm_code(n, m)
        self.n, self.m = n, m
        self.start = integer("start", start, low=0)
        self.target = 1.0 - n / m

    def check(self, targets) -> None:
        for target in targets:
            shape = tuple(target.param.shape)
            row = target.param.numel() // shape[0] if shape and shape[0] else 0
            if not shape or row % self.m:
                raise ValueError(
                    f"N:M pruning ({self.n}:{self.m}) of {target.name!r}: its rows (shape {shape} viewed as "
                    f"[out, in*...], row length {row}) are not a multiple of M={self.m}; exclude it "
                    f"(exclude=[{target.name!r}]) or choose a group size that divides {row}"
                )

    def attach(self, pruner) -> None:
        """Write the N:M pattern into every pruned tensor's coefficients."""
        for target in pruner.targets:
            pruner.optimizer.set_coefs(target.param, nm=self.code)

    def before_step(self, pruner, step: int) -> None:
        """At step ``start``: schedule the N:M decision."""
        if step == self.start:
            pruner.optimizer.schedule_pruning("nm")

    def state_dict(self) -> dict[str, Any]:
        """The pattern and the decision step."""
        return {"n": self.n, "m": self.m, "start": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check that the saved pattern is this method's (the decision step is restored)."""
        if (state.get("n"), state.get("m")) != (self.n, self.m):
            raise ValueError(f"this state is of an N:M method {state.get('n')}:{state.get('m')}, not {self.n}:{self.m}")
        self.start = integer("start", state.get("start", self.start), low=0)
