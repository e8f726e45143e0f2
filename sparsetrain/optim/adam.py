"""Fused Adam and AdamW: torch.optim's arguments and results, plus regularization, pruning and masks."""

from __future__ import annotations

from typing import Any

import torch

from .. import ops, validation
from .base import FusedOptimizer


class Adam(FusedOptimizer):
    """Drop-in for :class:`torch.optim.Adam` (betas, eps, coupled weight_decay, amsgrad, maximize).

    ``options``: ``backend``, ``skip_nonfinite``, ``seed``, ``l1_proximal``, ``capturable`` and
    torch.optim's ``foreach``, ``fused``, ``differentiable`` (see :class:`~sparsetrain.optim.FusedOptimizer`).
    ``decoupled_weight_decay=True`` makes it AdamW, as in torch.optim. Moments are float32 whatever
    the parameter dtype.
    """

    _decoupled = False

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool | None = None,
        **options,
    ) -> None:
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._decoupled
        if weight_decay is None:
            weight_decay = 1e-2 if self._decoupled else 0.0
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=bool(decoupled_weight_decay),
        )
        super().__init__(params, defaults, **options)

    def _check_hyperparameters(self, group: dict[str, Any], label: str) -> None:
        validation.adam_group(group, label)

    def _algo_states(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def torch_group_keys(self) -> tuple[str, ...]:
        return ("betas", "eps", "amsgrad")

    def _launch(self, call, grads, common) -> None:
        group = call.group
        beta1, beta2 = group["betas"]
        ops.call(
            ops.adam_step_,
            call.params,
            grads,
            call.lists["exp_avg"],
            call.lists["exp_avg_sq"],
            call.lists.get("max_exp_avg_sq", []),
            call.lists["step"],
            beta1=float(beta1),
            beta2=float(beta2),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled=bool(group.get("decoupled_weight_decay", self._decoupled)),
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
            **common,
        )


class AdamW(Adam):
    """Drop-in for :class:`torch.optim.AdamW`: Adam with decoupled weight decay (default 1e-2)."""

    _decoupled = True
