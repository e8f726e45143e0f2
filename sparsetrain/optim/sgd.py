"""Fused SGD: torch.optim.SGD's arguments and results, plus regularization, pruning and masks."""

from __future__ import annotations

from typing import Any

import torch

from .. import ops, validation
from .base import FusedOptimizer


class SGD(FusedOptimizer):
    """Drop-in for :class:`torch.optim.SGD` (momentum, dampening, nesterov, maximize, weight_decay).

    ``options``: ``backend``, ``skip_nonfinite``, ``seed``, ``l1_proximal``, ``capturable`` and
    torch.optim's ``foreach``, ``fused``, ``differentiable`` (see :class:`~sparsetrain.optim.FusedOptimizer`).
    As in torch.optim, a momentum buffer starts from the gradient on its first use, also when
    momentum is switched on mid-run (the state's ``step`` counts the steps since the buffer exists).
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
        **options,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        super().__init__(params, defaults, **options)

    def _check_hyperparameters(self, group: dict[str, Any], label: str) -> None:
        validation.sgd_group(group, label)

    def _algo_states(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def torch_group_keys(self) -> tuple[str, ...]:
        return ("momentum", "dampening", "nesterov")

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        new_buffer = group["momentum"] != 0 and "momentum_buffer" not in state and "step" in state
        super()._init_state(p, group)
        if new_buffer:  # the buffer's first use copies the gradient (step 1), as torch.optim's does
            state["step"].zero_()

    def _launch(self, call, grads, common) -> None:
        group = call.group
        ops.call(
            ops.sgd_step_,
            call.params,
            grads,
            call.lists.get("momentum_buffer", []),
            call.lists["step"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            **common,
        )
