"""Fused Adam and AdamW: torch.optim's arguments and results, plus regularization, pruning and masks."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from .. import ops, validation
from .base import FusedOptimizer


class Adam(FusedOptimizer):
    """Drop-in for ``torch.optim.Adam``, with regularization, pruning and masks in the same fused step.

    Without pruning it computes what ``torch.optim.Adam`` computes (same arguments, same results up to
    float32 rounding). Attach a :class:`~sparsetrain.Pruner` to prune: the method's coefficients and
    pruning decisions then run inside the same one-pass op (``torch.ops.sparsetrain.adam_step_``).
    Parameters may be float32, bfloat16 or float16; the math runs in float32, the moments are stored
    in the parameter's dtype (as torch.optim) unless ``state_dtype=torch.float32``.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts, as for
            ``torch.optim``.
        lr: learning rate (default ``1e-3``); a float, or a 1-element tensor.
        betas: coefficients of the running averages of the gradient and its square
            (default ``(0.9, 0.999)``).
        eps: term added to the denominator (default ``1e-8``).
        weight_decay: weight decay on every parameter; default ``None`` means ``0`` for Adam and
            ``1e-2`` for AdamW. Coupled (added to the gradient) for Adam, decoupled
            (``w *= 1 - lr * weight_decay``) for AdamW. A method's own ``l2`` applies only to the
            pruned tensors.
        amsgrad: the AMSGrad variant (default ``False``).
        maximize: maximize the objective instead of minimizing it (default ``False``).
        decoupled_weight_decay: default ``None``: ``False`` for Adam, ``True`` for AdamW; ``True``
            makes Adam behave as AdamW, as in ``torch.optim``.

    Keyword Args:
        **options: the options every sparsetrain optimizer shares (``backend``, ``skip_nonfinite``,
            ``seed``, ``l1_proximal``, ``capturable``, ``state_dtype`` and torch.optim's ``foreach``,
            ``fused``, ``differentiable``): see :class:`~sparsetrain.optim.FusedOptimizer`.

    State per parameter ``p`` (``opt.state[p]``): ``step`` (float32 scalar tensor on ``p``'s device),
    ``exp_avg``, ``exp_avg_sq`` and with ``amsgrad`` ``max_exp_avg_sq`` (``p``'s shape and dtype, or
    float32 with ``state_dtype=torch.float32``); for pruned parameters also ``mask_words`` (int32, 1 bit
    per element), ``stats``, ``coefs``, ``group_coefs`` (see :mod:`sparsetrain.optim.base`). ``step()``
    updates ``p`` and its state in place.

    Raises:
        ValueError: an invalid hyperparameter (negative ``lr``, ``eps`` or ``weight_decay``, a beta
            outside ``[0, 1)``), or ``capturable=True`` with the torch backend.
        TypeError: a parameter that is not a real floating-point dense tensor.
        BackendUnavailableError: an explicit ``backend`` that cannot run here.
    """

    _decoupled = False

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool | None = None,
        **options: Any,
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
    """Drop-in for ``torch.optim.AdamW``: :class:`Adam` with decoupled weight decay (default ``1e-2``).

    Without pruning it computes what ``torch.optim.AdamW`` computes; attach a
    :class:`~sparsetrain.Pruner` to prune inside the same fused step. Arguments, options, state and
    errors as :class:`Adam`, except that ``weight_decay`` defaults to ``1e-2`` and is applied as
    ``w *= 1 - lr * weight_decay`` (``decoupled_weight_decay`` defaults to ``True``).

    Example:
        ```python
        opt = sparsetrain.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
        pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.5, schedule="cubic", end=10_000))
        ```
    """

    _decoupled = True
