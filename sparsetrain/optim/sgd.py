"""Fused SGD: torch.optim.SGD's arguments and results, plus regularization, pruning and masks."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from .. import ops, validation
from .base import FusedOptimizer


class SGD(FusedOptimizer):
    """Drop-in for ``torch.optim.SGD``, with regularization, pruning and masks in the same fused step.

    Without pruning it computes what ``torch.optim.SGD`` computes (same arguments, same results up to
    float32 rounding). Attach a :class:`~sparsetrain.Pruner` to prune: the method's coefficients and
    pruning decisions then run inside the same one-pass op (``torch.ops.sparsetrain.sgd_step_``).
    As in ``torch.optim``, a momentum buffer starts from the gradient on its first use, also when
    momentum is switched on mid-run (the state's ``step`` counts the steps since the buffer exists).

    Parameters may be float32, bfloat16 or float16 (real floating point, dense); the math runs in
    float32, the momentum buffer is stored in the parameter's dtype (as torch.optim) unless
    ``state_dtype=torch.float32``.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts, as for
            ``torch.optim``.
        lr: learning rate (default ``1e-3``); a float, or a 1-element tensor.
        momentum: momentum factor (default ``0``).
        dampening: dampening of the momentum (default ``0``).
        weight_decay: coupled L2 weight decay on every parameter (default ``0``); a method's own
            ``l2`` applies only to the pruned tensors.
        nesterov: Nesterov momentum (default ``False``; needs ``momentum > 0`` and ``dampening == 0``).
        maximize: maximize the objective instead of minimizing it (default ``False``).

    Keyword Args:
        **options: the options every sparsetrain optimizer shares (``backend``, ``skip_nonfinite``,
            ``seed``, ``l1_proximal``, ``capturable``, ``state_dtype`` and torch.optim's ``foreach``,
            ``fused``, ``differentiable``): see :class:`~sparsetrain.optim.FusedOptimizer`.

    State per parameter ``p`` (``opt.state[p]``): ``step`` (float32 scalar tensor on ``p``'s device),
    ``momentum_buffer`` (``p``'s shape and dtype, or float32 with ``state_dtype=torch.float32``; when
    ``momentum != 0``); for pruned parameters also
    ``mask_words`` (int32, 1 bit per element), ``stats``, ``coefs``, ``group_coefs`` (see
    :mod:`sparsetrain.optim.base`). ``step()`` updates ``p`` and its state in place.

    Raises:
        ValueError: an invalid hyperparameter (negative ``lr``, ``momentum`` or ``weight_decay``,
            nesterov without momentum), or ``capturable=True`` with the torch backend.
        TypeError: a parameter that is not a real floating-point dense tensor.
        BackendUnavailableError: an explicit ``backend`` that cannot run here.

    Example:
        ```python
        opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        pruner = sparsetrain.Pruner(model, opt, methods.StochasticMagnitude(0.9, end=5000))
        ```
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        **options: Any,
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
