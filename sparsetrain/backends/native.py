"""The native backend: the C++ drivers of ``csrc/``, compiled at install into ``sparsetrain._C``.

One header (``csrc/element.h``) holds the per-element contract; the CPU driver (a fused pass over
all tensors of a call with ``at::parallel_for``) and the CUDA driver (one multi-tensor kernel launch)
use it and register themselves as the CPU and CUDA implementations of
``torch.ops.sparsetrain_native.sgd_step_`` / ``adam_step_``. ``setup.py`` builds the CPU driver
whenever a C++ compiler and torch are present at install, and adds the CUDA driver for a CUDA
build of torch with a CUDA toolkit; what was built (or why nothing was) is reported by
:func:`available` and :func:`build_info`, and printed by ``sparsetrain info``.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib import resources

import torch

from ..contract import PRUNE_MODES, STATS_ALL
from . import stand_ins, write_back

_PRUNE_INDEX = {mode: index for index, mode in enumerate(PRUNE_MODES)}


def build_status() -> str:
    """What the install built: ``"built: ..."`` or ``"not built: <reason>"`` (from ``setup.py``)."""
    try:
        return resources.files("sparsetrain").joinpath("_native_build.txt").read_text().strip()
    except (FileNotFoundError, OSError):
        return "not built: this installation has no build record (installed without running setup.py's build)"


@cache
def _load() -> tuple[bool, str]:
    try:
        importlib.import_module("sparsetrain._C")
    except ImportError as exc:
        status = build_status()
        reason = status if status.startswith("not built") else f"{status}, but importing it failed: {exc}"
        return False, f"the extension sparsetrain._C is not available ({reason})"
    return True, ""


def available() -> tuple[bool, str]:
    return _load()


def build_info() -> str:
    """``"cpu"`` or ``"cpu,cuda:<TORCH_CUDA_ARCH_LIST>"``; empty when the extension is not available."""
    if not _load()[0]:
        return ""
    return torch.ops.sparsetrain_native.build_info()


def supports(device: torch.device) -> tuple[bool, str]:
    """Whether the built drivers cover tensors on ``device`` (and why not)."""
    usable, reason = _load()
    if not usable:
        return False, reason
    if device.type == "cpu":
        return True, ""
    if device.type == "cuda":
        if "cuda" in build_info():
            return True, ""
        return False, f"sparsetrain._C was built without its CUDA driver ({build_status()})"
    return False, f"the native backend has no driver for {device.type} tensors"


def _require() -> None:
    usable, reason = _load()
    if not usable:
        raise RuntimeError(reason)


def _check_nm(prune: str, params, tensor_coefs, shard_offsets) -> None:
    """The CUDA kernel reads N:M patterns on the device: they are checked here first (the CPU driver checks its own)."""
    if prune == "nm" and params[0].is_cuda:
        from .torch_ref import check_nm

        check_nm(params, tensor_coefs, shard_offsets)


def sgd_step(
    params,
    grads,
    momentum_buffers,
    steps,
    *,
    mask_words,
    stats,
    tensor_coefs,
    group_coefs,
    group_inner,
    shard_offsets,
    seeds,
    found_inf,
    lr,
    lr_tensor,
    weight_decay,
    momentum,
    dampening,
    nesterov,
    maximize,
    prune,
    regularize,
    l1_proximal,
    stats_mask=STATS_ALL,
) -> None:
    """Fused SGD step on the native drivers (same function as the torch reference)."""
    if not params:
        return
    _require()
    _check_nm(prune, params, tensor_coefs, shard_offsets)
    params, staged = stand_ins(params)
    momentum_buffers, widened = stand_ins(momentum_buffers, torch.float32)  # the drivers read float32
    torch.ops.sparsetrain_native.sgd_step_(
        params, stand_ins(grads)[0], momentum_buffers, steps, mask_words, stats, tensor_coefs, group_coefs,
        list(group_inner), list(shard_offsets), seeds, found_inf, float(lr), lr_tensor, float(weight_decay),
        float(momentum), float(dampening), bool(nesterov), bool(maximize), _PRUNE_INDEX[prune], bool(regularize),
        bool(l1_proximal), int(stats_mask),
    )  # fmt: skip
    write_back(widened + staged)


def adam_step(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    steps,
    *,
    mask_words,
    stats,
    tensor_coefs,
    group_coefs,
    group_inner,
    shard_offsets,
    seeds,
    found_inf,
    lr,
    lr_tensor,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled,
    amsgrad,
    maximize,
    prune,
    regularize,
    l1_proximal,
    stats_mask=STATS_ALL,
) -> None:
    """Fused Adam / AdamW step on the native drivers (same function as the torch reference)."""
    if not params:
        return
    _require()
    _check_nm(prune, params, tensor_coefs, shard_offsets)
    params, staged = stand_ins(params)
    exp_avgs, widened = stand_ins(exp_avgs, torch.float32)  # the drivers read float32
    exp_avg_sqs, widened_sq = stand_ins(exp_avg_sqs, torch.float32)
    max_exp_avg_sqs, widened_max = stand_ins(max_exp_avg_sqs if amsgrad else [], torch.float32)
    widened += widened_sq + widened_max
    torch.ops.sparsetrain_native.adam_step_(
        params, stand_ins(grads)[0], exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, mask_words,
        stats, tensor_coefs, group_coefs, list(group_inner), list(shard_offsets), seeds, found_inf, float(lr),
        lr_tensor, float(beta1), float(beta2), float(eps), float(weight_decay), bool(decoupled), bool(amsgrad),
        bool(maximize), _PRUNE_INDEX[prune], bool(regularize), bool(l1_proximal), int(stats_mask),
    )  # fmt: skip
    write_back(widened + staged)
