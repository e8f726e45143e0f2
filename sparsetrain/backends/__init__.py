"""Backend registry: which implementations of the fused-step ops exist, and whether each is usable.

A backend is a module exposing ``available() -> (usable, reason)``, ``sgd_step(...)`` and
``adam_step(...)`` with the signatures of :mod:`sparsetrain.backends.torch_ref`. Modules are
imported only when first asked for, so ``import sparsetrain`` never imports Triton or a compiled
extension.
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from types import ModuleType

import torch
from torch import Tensor

BACKENDS = ("torch", "triton", "native")
_MODULES = {
    "torch": "sparsetrain.backends.torch_ref",
    "triton": "sparsetrain.backends.triton_backend",
    "native": "sparsetrain.backends.native",
}
# Preference of backend="auto": the first usable backend that runs tensors on that device type.
AUTO_ORDER = {"cuda": ("native", "triton", "torch"), "cpu": ("native", "torch")}


class TensorList(list):
    """A list of tensors an optimizer owns and keeps across steps.

    A backend may cache work per list (the Triton backend's plan: address table, block map); it
    holds such a list only weakly, so the cache entry goes when the optimizer drops the list.
    """

    __slots__ = ("__weakref__",)


def contiguous_params(params: list[Tensor]) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """``params`` with every tensor in another dense layout (channels_last, a transposed view) replaced
    by a contiguous copy, and the ``(param, copy)`` pairs to write back after the step.

    The copy holds the elements in logical (row-major) order, so element indices, and with them the
    random stream, the group index and the mask bits, are those of the contiguous layout: a model
    steps to the same weights and masks in any dense layout. Costs one extra read and write of those
    tensors per step; contiguous tensors are passed through untouched.
    """
    if all(p.is_contiguous() for p in params):
        return params, []
    out, pairs = [], []
    for p in params:
        if p.is_contiguous():
            out.append(p)
        else:
            out.append(p.contiguous())
            pairs.append((p, out[-1]))
    return TensorList(out), pairs


def write_back(pairs: list[tuple[Tensor, Tensor]]) -> None:
    """Copy the stepped contiguous stand-ins of :func:`contiguous_params` into their parameters."""
    for param, copy in pairs:
        param.copy_(copy)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


@cache
def module(name: str) -> ModuleType:
    check_name(name)
    return importlib.import_module(_MODULES[name])


def check_name(name: str) -> None:
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"unknown backend {name!r}; choose one of 'auto', " + ", ".join(repr(b) for b in BACKENDS))


@cache
def availability(name: str) -> tuple[bool, str]:
    """(usable, reason) for backend ``name`` on this machine; ``reason`` is empty when usable."""
    check_name(name)
    try:
        mod = module(name)
    except Exception as exc:  # an import failure is exactly the reason to report
        return False, f"cannot import {_MODULES[name]}: {type(exc).__name__}: {exc}"
    return mod.available()


def resolve(requested: str | None, device: torch.device) -> str:
    """The backend to use for tensors on ``device``.

    ``requested`` ``None`` reads ``SPARSETRAIN_BACKEND`` (default ``"auto"``). ``"auto"`` picks
    the first usable of native, triton, torch on CUDA devices, native then torch on the
    CPU, and torch elsewhere; every backend
    computes the same function, so the choice never changes results beyond rounding. An
    explicit backend that is not usable raises :class:`BackendUnavailableError` with the reason.
    """
    name = requested if requested is not None else os.environ.get("SPARSETRAIN_BACKEND", "auto")
    check_name(name)
    if name == "auto":
        return next(b for b in AUTO_ORDER.get(device.type, ("torch",)) if runs_on(b, device)[0])
    usable, reason = runs_on(name, device)
    if not usable:
        raise BackendUnavailableError(f"backend {name!r} is not usable here: {reason}")
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailableError(
            f"backend 'triton' needs CUDA tensors (got {device}); CPU tensors run only under TRITON_INTERPRET=1"
        )
    return name


def runs_on(name: str, device: torch.device) -> tuple[bool, str]:
    """(usable, reason) for backend ``name`` on tensors of ``device`` (the native build may lack CUDA)."""
    usable, reason = availability(name)
    if usable and name == "native":
        return module(name).supports(device)
    return usable, reason
