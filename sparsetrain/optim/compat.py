"""torch.optim compatibility: its keywords, its param-group forms and its state_dicts.

* Keywords ``foreach``, ``fused``, ``differentiable`` and ``capturable`` are accepted and kept in
  the param groups under torch.optim's names, so a state_dict saved here loads into torch.optim.
  ``foreach`` and ``fused`` are hints only: every step is already one fused call per param group,
  and ``backend`` picks the implementation. ``differentiable=True`` is refused (the fused step is
  an in-place update outside autograd).
* Param groups may hold any iterable (a generator such as ``model.parameters()`` included) and
  named parameters (``model.named_parameters()``, kept as ``param_names`` as torch.optim does).
* A torch.optim SGD / Adam / AdamW state_dict converts to this package's format
  (:func:`from_torch_state_dict`): the continued run is the one torch.optim would have taken.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .base import FusedOptimizer

TORCH_GROUP_KEYS = ("foreach", "fused", "differentiable", "capturable")


def torch_keywords(defaults: dict[str, Any], *, foreach: bool | None, fused: bool | None, differentiable: bool) -> None:
    """Check torch.optim's implementation keywords and record them in ``defaults`` (in place)."""
    if differentiable:
        raise ValueError(
            "differentiable=True is not supported: the fused step updates parameters in place outside autograd; "
            "use torch.optim for differentiating through optimizer steps"
        )
    for name, value in (("foreach", foreach), ("fused", fused)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be None or a bool, got {type(value).__name__}")
    defaults.update(foreach=foreach, fused=fused, differentiable=False)


def group_params(params: Any) -> list[Tensor] | list[tuple[str, Tensor]]:
    """A param group's ``params`` as a list (a tensor, any iterable, or (name, tensor) pairs)."""
    if isinstance(params, Tensor):
        return [params]
    if isinstance(params, set):
        raise TypeError("param group 'params' must be an ordered collection, not a set (its order varies between runs)")
    return list(params)


def unnamed(params: list[Any]) -> list[Any]:
    """The tensors of a param list that may hold (name, tensor) pairs."""
    return [p[1] if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) else p for p in params]


def is_torch_state_dict(state_dict: dict[str, Any]) -> bool:
    return "sparsetrain" not in state_dict and "state" in state_dict and "param_groups" in state_dict


def from_torch_state_dict(opt: FusedOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Convert a torch.optim state_dict of the same algorithm into this optimizer's format.

    SGD: ``step`` is 1 where torch.optim holds a momentum buffer and 0 where it has none (the next
    step then starts the buffer from the gradient, as torch.optim does). Adam / AdamW: ``step``,
    ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq`` carry over. Raises ``ValueError`` if the
    state_dict is not one of the same algorithm with the same parameters.
    """
    name = type(opt).__name__
    states = state_dict["state"].values() if isinstance(state_dict["state"], dict) else ()
    if any(isinstance(saved, dict) and "mask_words" in saved for saved in states):
        raise ValueError(
            f"{name}.load_state_dict: a sparsetrain state_dict without its 'sparsetrain' entry (the base seed, "
            "event counter and pruner state), neither at the top nor in the first parameter's state; save and "
            "load the optimizer's whole state_dict"
        )
    groups = state_dict["param_groups"]
    expected = opt.torch_group_keys()
    for index, group in enumerate(groups):
        missing = [k for k in expected if k not in group]
        if missing:
            raise ValueError(
                f"{name}.load_state_dict: param group {index} of the torch.optim state_dict lacks {missing}: "
                f"it was not saved by torch.optim.{'Adam/AdamW' if name != 'SGD' else 'SGD'}"
            )
        if name != "SGD" and "decoupled_weight_decay" in group and "decoupled_weight_decay" in opt.defaults:
            if bool(group["decoupled_weight_decay"]) != bool(opt.defaults["decoupled_weight_decay"]):
                saved = "AdamW" if group["decoupled_weight_decay"] else "Adam"
                raise ValueError(f"{name}.load_state_dict: the state_dict was saved by torch.optim.{saved}, not {name}")
    params = [p for g in opt.param_groups for p in g["params"]]
    saved_ids = [i for g in groups for i in g["params"]]
    if len(saved_ids) != len(params) or len(groups) != len(opt.param_groups):
        raise ValueError(
            f"{name}.load_state_dict: the torch.optim state_dict has {len(saved_ids)} parameters in {len(groups)} "
            f"groups, this optimizer {len(params)} in {len(opt.param_groups)}"
        )
    by_id = dict(zip(saved_ids, params))
    state: dict[Any, dict[str, Any]] = {}
    for key, saved in state_dict["state"].items():
        p = by_id.get(key)
        if p is None:
            raise ValueError(f"{name}.load_state_dict: state for unknown parameter id {key!r}")
        converted: dict[str, Any] = {}
        for field, value in saved.items():
            if value is None:
                continue
            if field == "step":
                converted["step"] = torch.as_tensor(value, dtype=torch.float32).reshape(())
            elif isinstance(value, Tensor):
                if value.shape != p.shape:
                    raise ValueError(
                        f"{name}.load_state_dict: state {field!r} has shape {tuple(value.shape)}, param "
                        f"{tuple(p.shape)}"
                    )
                converted[field] = value.to(torch.float32)
            else:
                converted[field] = value
        if name == "SGD":
            converted["step"] = torch.tensor(1.0 if "momentum_buffer" in converted else 0.0)
        state[key] = converted
    out_groups = []
    for group in groups:
        fresh = dict(group)
        for key, default in opt.defaults.items():
            fresh.setdefault(key, default)
        out_groups.append(fresh)
    return {
        "state": state,
        "param_groups": out_groups,
        "sparsetrain": {
            "format": None,
            "optimizer": name,
            "base_seed": opt.base_seed,
            "prune_events": 0,
            "regularize": False,
            "uses_groups": False,
            "param_shapes": [tuple(p.shape) for p in params],
        },
    }
