"""Checks of everything the optimizers, their state_dict loader and the Pruner accept.

Every public entry point that changes tensors, counters or lists (``add_param_group``, ``step``,
``enable_pruning``, ``set_mask``, ``set_coefs``, ``schedule_pruning``, ``load_state_dict``,
``Pruner(...)``, the methods' constructors) calls the matching function here *before* it changes
anything, so a refused call leaves the optimizer, the model and the pruner exactly as they were.
Errors name the tensor as "parameter i of param group j", its shape, and what was expected.

Defined behaviour on every backend (documented here because the checks enforce it):

* a parameter may appear only once in an optimizer (in one group or across groups): a duplicate is
  refused, where ``torch.optim`` only warns and then updates the tensor twice per step;
* gradients must have their parameter's shape, dtype and device (a backend reads them with the
  parameter's element width); the Triton backend also needs dense (contiguous) fp32 / bf16 / fp16
  tensors;
* a parameter whose elements share memory (stride 0 over a dimension, as ``expand`` makes, or
  interleaved strides) is refused at ``step`` before anything changes, on every backend;
* a checkpoint is checked whole (keys, dtypes, shapes, mask word counts, values) before anything is
  replaced: mask words int32 ``[ceil(numel / 32)]`` with zero padding bits, statistics float64
  ``[NUM_STATS]``, coefficients float32 ``[NUM_COEFS]``, group tables float32 ``[2, G]``; algorithm
  buffers of any floating dtype are loaded as float32, the dtype every backend reads.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from . import contract
from . import masks as mask_format
from .distributed import local

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
PRUNING_KEYS = ("mask_words", "stats", "coefs", "group_coefs", "group_inner")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# param-group keys a saved group may lack (older state_dicts): the optimizer's defaults fill them
OPTIONAL_GROUP_KEYS = ("foreach", "fused", "differentiable", "capturable", "decoupled_weight_decay")
COEF_NAMES = ("l2", "l1", "sd", "sd_beta", "threshold", "prune_count", "temperature", "nm")


def where(group: int, index: int) -> str:
    """How errors name a tensor: "parameter i of param group j"."""
    return f"parameter {index} of param group {group}"


def describe(x: Tensor) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}"


# ------------------------------------------------------------------------------------------ numbers
def number(name: str, value: Any, *, low: float | None = None, high: float | None = None, strict_low=False,
           strict_high=False, finite: bool = True) -> float:  # fmt: skip
    """``value`` as a float, refused when NaN, infinite (unless ``finite=False``) or out of range."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} as a Tensor must have one element, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if finite and abs(value) > FLOAT32_MAX:  # the kernels compute in float32
        raise ValueError(f"{name} must be a finite float32 number (magnitude at most {FLOAT32_MAX:.4g}), got {value}")
    if low is not None and (value < low or (strict_low and value == low)):
        raise ValueError(f"{name} must be {'>' if strict_low else '>='} {low}, got {value}")
    if high is not None and (value > high or (strict_high and value == high)):
        raise ValueError(f"{name} must be {'<' if strict_high else '<='} {high}, got {value}")
    return value


def integer(name: str, value: Any, *, low: int | None = None) -> int:
    """``value`` as an int (bools and floats refused), at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


# ------------------------------------------------------------------------------- params and groups
def check_param(label: str, p: Any) -> None:
    """A tensor the fused optimizers can own: a dense, real floating-point leaf."""
    if not isinstance(p, Tensor):
        raise TypeError(f"{label} is a {type(p).__name__}, not a Tensor")
    if p.is_complex() or not p.is_floating_point():
        raise TypeError(f"{label} has dtype {p.dtype}; only real floating-point parameters can be optimized")
    if p.layout != torch.strided:
        raise TypeError(f"{label} has layout {p.layout}; only dense parameters are supported")
    if not p.is_leaf and not p.retains_grad:
        raise ValueError(f"{label} ({describe(p)}) is not a leaf tensor; optimizers step leaf tensors")


def group_params(params: list[Any], group_index: int, existing: Iterable[dict[str, Any]]) -> None:
    """Each of a new group's parameters checked, none repeated within the group or across groups."""
    seen: dict[int, str] = {}
    for j, group in enumerate(existing):
        for i, p in enumerate(group["params"]):
            seen[id(p)] = where(j, i)
    for i, p in enumerate(params):
        label = where(group_index, i)
        check_param(label, p)
        if id(p) in seen:
            raise ValueError(
                f"{label} ({describe(p)}) is the same tensor as {seen[id(p)]}; a parameter may appear only once"
            )
        seen[id(p)] = label


def learning_rate(group: Mapping[str, Any], label: str) -> None:
    lr = group["lr"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"{label}: lr as a Tensor must have one element, got shape {tuple(lr.shape)}")
    number(f"{label}: lr", lr, low=0.0)


def sgd_group(group: Mapping[str, Any], label: str) -> None:
    """SGD's hyperparameters (``torch.optim.SGD``'s rules, and NaN / inf refused)."""
    learning_rate(group, label)
    momentum = number(f"{label}: momentum", group["momentum"], low=0.0)
    dampening = number(f"{label}: dampening", group["dampening"])
    number(f"{label}: weight_decay", group["weight_decay"], low=0.0)
    if flag(f"{label}: nesterov", group["nesterov"]) and (momentum <= 0 or dampening != 0):
        raise ValueError(f"{label}: Nesterov momentum requires a momentum and zero dampening")
    flag(f"{label}: maximize", group["maximize"])


def adam_group(group: Mapping[str, Any], label: str) -> None:
    """Adam / AdamW's hyperparameters (``torch.optim.Adam``'s rules, and NaN / inf refused)."""
    learning_rate(group, label)
    betas = group["betas"]
    if isinstance(betas, Tensor) or not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{label}: betas must be a pair of numbers, got {betas!r}")
    for index, beta in enumerate(betas):
        number(f"{label}: beta parameter at index {index}", beta, low=0.0, high=1.0, strict_high=True)
    number(f"{label}: epsilon", group["eps"], low=0.0)
    number(f"{label}: weight_decay", group["weight_decay"], low=0.0)
    flag(f"{label}: amsgrad", group["amsgrad"])
    flag(f"{label}: maximize", group["maximize"])


def full_group(param_group: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``param_group`` with the optimizer's defaults filled in (as ``torch.optim`` fills them)."""
    group = dict(param_group)
    for key, value in defaults.items():
        group.setdefault(key, value)
    return group


def state_dtype(value: Any) -> torch.dtype | None:
    """The optimizer's ``state_dtype`` option: ``None`` (buffers follow each parameter's dtype) or float32."""
    if value is None or value == torch.float32:
        return value
    raise ValueError(
        f"state_dtype must be None (algorithm buffers in each parameter's dtype, as torch.optim) or torch.float32 "
        f"(float32 buffers for every parameter), got {value!r}"
    )


# ------------------------------------------------------------------------------------------- steps
def step_tensors(calls: list[Any], backend: str, sharded: bool = True) -> None:
    """Before a step launches anything: every gradient matches its parameter; the backend can read both.

    ``calls`` are the optimizer's per-group calls (``params``, ``where``); gradients are read fresh.
    ``sharded=False`` (no DTensor parameter) skips looking for shards.
    """
    triton = backend == "triton"
    for call in calls:
        for label, source in zip(call.where, call.sources):
            p, g = (local(source), local(source.grad)) if sharded else (source, source.grad)  # FSDP2: the shards
            if g.layout != torch.strided:
                raise RuntimeError(
                    f"{label} ({describe(p)}) has a {'sparse' if g.is_sparse else str(g.layout)} gradient; "
                    "sparsetrain optimizers need dense gradients"
                )
            if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                raise RuntimeError(
                    f"{label} ({describe(p)}, on {p.device}) has a gradient of {describe(g)} on {g.device}; "
                    "the gradient must have its parameter's shape, dtype and device"
                )
            if triton:
                if p.dtype not in TRITON_DTYPES:
                    raise RuntimeError(
                        f"{label} ({describe(p)}): the Triton backend supports fp32, bf16 and fp16 parameters"
                    )
            if not p.is_contiguous() and overlapping(p):  # a contiguous tensor never overlaps itself
                raise RuntimeError(
                    f"{label} ({describe(p)}) has strides {tuple(p.stride())}: some of its elements share memory "
                    "(an expanded or overlapping view), so it cannot be updated in place (call .clone() on it)"
                )


def overlapping(x: Tensor) -> bool:
    """Whether elements of ``x`` may share memory: with its dimensions of size > 1 sorted by stride,
    each stride must exceed the span of the smaller ones (a stride 0 never does). Dense layouts
    (contiguous, channels_last, transposed) and sliced views with gaps pass."""
    span = 0
    for size, stride in sorted(((n, s) for n, s in zip(x.shape, x.stride()) if n > 1), key=lambda d: d[1]):
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


# ----------------------------------------------------------------------------------------- pruning
def owned(optimizer: Any, param: Any, what: str) -> str:
    """The label of ``param`` in ``optimizer``, or a clear error when it is not one of its parameters."""
    if isinstance(param, Tensor):
        for j, group in enumerate(optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                if p is param:
                    return where(j, i)
        raise ValueError(f"{what}: the tensor ({describe(param)}) is not a parameter of this optimizer")
    raise TypeError(f"{what}: expected a parameter Tensor, got {type(param).__name__}")


def pruning_layout(label: str, numel: int, groups: Any, group_inner: Any) -> tuple[int, int]:
    """(groups, group_inner) of ``enable_pruning``: ``groups`` divides ``numel``, ``group_inner`` >= 1."""
    groups = integer(f"enable_pruning({label}): groups", groups, low=1)
    if numel % groups:
        raise ValueError(f"enable_pruning({label}): {groups} groups do not divide a tensor of {numel} elements")
    if group_inner is None:
        return groups, max(1, numel // groups)
    return groups, integer(f"enable_pruning({label}): group_inner", group_inner, low=1)


def coefficient(name: str, value: Any, label: str) -> float:
    """A per-tensor coefficient: known name, not NaN, not negative (``threshold`` may be +inf)."""
    if name not in COEF_NAMES:
        raise ValueError(f"set_coefs({label}): unknown coefficient {name!r}; choose from {', '.join(COEF_NAMES)}")
    value = number(f"set_coefs({label}): {name}", value, low=0.0, finite=name != "threshold")
    if name == "nm" and value != 0.0:
        try:
            contract.nm_pattern(value)
        except ValueError as exc:
            raise ValueError(f"set_coefs({label}): {exc}") from None
    return value


def mask_for(label: str, param: Tensor, alive: Any) -> None:
    if not isinstance(alive, Tensor) or alive.dtype != torch.bool:
        kind = f"a {alive.dtype} tensor" if isinstance(alive, Tensor) else type(alive).__name__
        raise TypeError(f"set_mask({label}): the mask must be a bool tensor, got {kind}")
    if alive.shape != param.shape:
        raise ValueError(f"set_mask({label}): mask shape {tuple(alive.shape)} != parameter shape {tuple(param.shape)}")


def prune_mode(optimizer: Any, mode: Any) -> None:
    if mode not in contract.PRUNE_MODES:
        raise ValueError(f"unknown prune mode {mode!r}; choose one of {contract.PRUNE_MODES}")
    if mode == "group" and not optimizer.uses_groups:
        raise ValueError(
            "schedule_pruning('group') needs per-group tables: enable_pruning(param, groups=G) on the tensors and "
            "optimizer.uses_groups = True (a Pruner with a structured method sets both)"
        )


# -------------------------------------------------------------------------------------- state_dict
def _tensor(label: str, field: str, value: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{label}: state {field!r} must be a Tensor, got {type(value).__name__}")
    if value.dtype != dtype or tuple(value.shape) != shape:
        raise ValueError(f"{label}: state {field!r} is {describe(value)}; expected dtype {dtype}, shape {shape}")
    return value


def param_state(label: str, p: Tensor, saved: Any, buffers: tuple[str, ...]) -> None:
    """One parameter's saved state: known keys, the dtypes and shapes every backend reads, sane values.

    For a DTensor parameter, buffers and mask words are those of the local shard and the statistics
    may be global sums (at most the full tensor's element count alive).
    """
    total, p = p.numel(), local(p)
    if not isinstance(saved, Mapping):
        raise TypeError(f"{label}: its state must be a dict, got {type(saved).__name__}")
    allowed = {"step", *buffers, *PRUNING_KEYS}
    unknown = sorted(str(k) for k in saved if k not in allowed)
    if unknown:
        raise ValueError(
            f"{label} ({describe(p)}): unknown state entries {unknown}; expected some of {sorted(allowed)}"
        )
    if "step" in saved:
        step = saved["step"]
        if isinstance(step, Tensor) and (step.numel() != 1 or step.is_complex() or step.dtype == torch.bool):
            raise ValueError(f"{label}: state 'step' must be a real scalar, got {describe(step)}")
        number(f"{label}: state 'step'", step, low=0.0)
    for name in buffers:
        value = saved.get(name)
        if value is None:
            continue
        if not isinstance(value, Tensor) or not value.is_floating_point():
            kind = describe(value) if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(f"{label} ({describe(p)}): state {name!r} must be a floating-point tensor, got {kind}")
        if value.shape != p.shape:
            raise ValueError(f"{label}: state {name!r} has shape {tuple(value.shape)}, its parameter {tuple(p.shape)}")
    present = [k for k in PRUNING_KEYS if k in saved]
    if not present:
        return
    if len(present) != len(PRUNING_KEYS):
        missing = [k for k in PRUNING_KEYS if k not in saved]
        raise ValueError(f"{label} ({describe(p)}): pruning state has {present} but lacks {missing}")
    numel = p.numel()
    words = _tensor(label, "mask_words", saved["mask_words"], torch.int32, (mask_format.num_words(numel),))
    if numel % 32 and words.numel():
        last = int(words[-1]) & 0xFFFFFFFF
        if last >> (numel % 32):
            raise ValueError(f"{label}: state 'mask_words' has bits set past the tensor's {numel} elements")
    stats = _tensor(label, "stats", saved["stats"], torch.float64, (contract.NUM_STATS,))
    values = stats.tolist()
    if not all(math.isfinite(v) and v >= 0 for v in values) or values[contract.STAT_ALIVE] > total:
        raise ValueError(f"{label}: state 'stats' holds {values}: negative, non-finite or more alive than {total}")
    coefs = _tensor(label, "coefs", saved["coefs"], torch.float32, (contract.NUM_COEFS,))
    for name in COEF_NAMES:
        coefficient(name, coefs[getattr(contract, f"COEF_{name.upper()}")], label)
    inner = integer(f"{label}: state 'group_inner'", saved["group_inner"], low=1)
    table = saved["group_coefs"]
    if not isinstance(table, Tensor) or table.dim() != 2 or table.shape[0] != 2 or table.shape[1] < 1:
        kind = describe(table) if isinstance(table, Tensor) else type(table).__name__
        raise ValueError(f"{label}: state 'group_coefs' must be a float32 tensor of shape (2, G), got {kind}")
    _tensor(label, "group_coefs", table, torch.float32, tuple(table.shape))
    if not bool(torch.isfinite(table).all()):
        raise ValueError(f"{label}: state 'group_coefs' holds non-finite values")
    del inner


def state_dict(optimizer: Any, sd: Any, state_format: int) -> list[dict[str, Any]]:
    """Check a whole optimizer state_dict against ``optimizer``; nothing is changed here.

    Returns the saved param groups completed with the optimizer's defaults (what will be loaded).
    """
    name = type(optimizer).__name__
    if not isinstance(sd, Mapping):
        raise TypeError(f"{name}.load_state_dict: expected a dict, got {type(sd).__name__}")
    meta = sd.get("sparsetrain")
    if meta is None:
        raise ValueError(f"{name}.load_state_dict: not a sparsetrain state_dict (no 'sparsetrain' entry)")
    for key in ("state", "param_groups"):
        if key not in sd:
            raise ValueError(f"{name}.load_state_dict: the state_dict has no {key!r} entry")
    need = ("format", "optimizer", "base_seed", "prune_events", "regularize", "uses_groups", "param_shapes")
    missing = [k for k in need if k not in meta]
    if missing:
        raise ValueError(f"{name}.load_state_dict: the 'sparsetrain' entry lacks {missing}")
    if meta["optimizer"] != name:
        raise ValueError(f"{name}.load_state_dict: the state_dict was saved by {meta['optimizer']}, not {name}")
    if meta["format"] != state_format:
        raise ValueError(f"{name}.load_state_dict: state format {meta['format']!r}, this version reads {state_format}")
    integer("base_seed", meta["base_seed"], low=0)
    integer("prune_events", meta["prune_events"], low=0)
    flag("regularize", meta["regularize"])
    flag("uses_groups", meta["uses_groups"])
    saved_groups = sd["param_groups"]
    if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(optimizer.param_groups):
        count = len(saved_groups) if isinstance(saved_groups, (list, tuple)) else type(saved_groups).__name__
        raise ValueError(
            f"{name}.load_state_dict: {count} param groups saved, this optimizer has {len(optimizer.param_groups)}"
        )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    shapes = [tuple(p.shape) for p in params]
    saved_shapes = [tuple(s) for s in meta["param_shapes"]]
    if saved_shapes != shapes or any(
        not isinstance(s, Mapping) or len(s.get("params", ())) != len(g["params"])
        for s, g in zip(saved_groups, optimizer.param_groups)
    ):
        raise ValueError(
            f"{name}.load_state_dict: the state_dict belongs to another model "
            f"(saved parameter shapes {saved_shapes[:4]}..., here {shapes[:4]}...)"
        )
    groups = []
    labels: dict[Any, tuple[str, Tensor, dict[str, Any]]] = {}
    for j, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
        missing = [k for k in optimizer.defaults if k not in saved and k not in OPTIONAL_GROUP_KEYS]
        if missing:
            raise ValueError(f"{name}.load_state_dict: param group {j} lacks {missing}")
        fresh = full_group({k: v for k, v in saved.items() if k != "params"}, optimizer.defaults)
        fresh["params"] = group["params"]
        optimizer._check_hyperparameters(fresh, f"param group {j}")
        groups.append(fresh)
        for i, (key, p) in enumerate(zip(saved["params"], group["params"])):
            if key in labels:
                raise ValueError(f"{name}.load_state_dict: parameter id {key!r} appears twice in the param groups")
            labels[key] = (where(j, i), p, fresh)
    state = sd["state"]
    if not isinstance(state, Mapping):
        raise TypeError(f"{name}.load_state_dict: 'state' must be a dict, got {type(state).__name__}")
    for key, saved in state.items():
        if key not in labels:
            raise ValueError(f"{name}.load_state_dict: state for parameter id {key!r}, which no param group lists")
        label, p, group = labels[key]
        param_state(label, p, saved, optimizer._algo_states(group))
    return groups
