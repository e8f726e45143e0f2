"""Fused SGD: torch.optim.SGD's arguments and results, plus regularization, pruning and masks."""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from .base import FusedOptimizer


class SGD(FusedOptimizer):
    """Drop-in for :class:`torch.optim.SGD` (momentum, dampening, nesterov, maximize, weight_decay).

    ``backend``: ``"auto"`` (default, or env ``SPARSETRAIN_BACKEND``), ``"torch"``, ``"triton"``
    or ``"cuda"``. ``skip_nonfinite=True`` skips the whole step when any gradient holds inf/NaN
    (detected on the device, without a host sync per tensor). ``seed`` is the base seed of the
    pruning random stream. ``l1_proximal`` selects the proximal (default) or subgradient L1 form.
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        backend: str | None = None,
        skip_nonfinite: bool = False,
        seed: int = 0,
        l1_proximal: bool = True,
    ) -> None:
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        super().__init__(
            params, defaults, backend=backend, skip_nonfinite=skip_nonfinite, seed=seed, l1_proximal=l1_proximal
        )

    def _algo_states(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _launch(self, group, params, grads, common) -> None:
        states = [self.state[p] for p in params]
        ops.sgd_step_(
            params,
            grads,
            [s["momentum_buffer"] for s in states] if group["momentum"] != 0 else [],
            [s["step"] for s in states],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            **common,
        )
