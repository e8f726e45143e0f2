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

from .. import scan

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


def stand_ins(
    tensors: list[Tensor], dtype: torch.dtype | None = None
) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
    """``tensors`` with each one a kernel cannot step as it is replaced by a contiguous copy (of ``dtype``
    when given), and the ``(tensor, copy)`` pairs to :func:`write_back` after the step.

    Layouts: a tensor in another dense layout (channels_last, a transposed view) is copied in logical
    (row-major) order, so element indices, and with them the random stream, the group index and the
    mask bits, are those of the contiguous layout: a model steps to the same weights and masks in any
    dense layout. Dtypes: ``dtype=torch.float32`` gives 16-bit optimizer buffers float32 working copies
    for drivers that read float32; the step computes in float32 and each value is rounded once when
    written back, the contract of every backend. Each copy costs one extra read and write of its
    tensor per step; tensors that need none are passed through untouched.
    """

    def fits(x: Tensor) -> bool:
        return x.is_contiguous() and (dtype is None or x.dtype == dtype)

    if scan.all_contiguous(tensors) and (dtype is None or all(x.dtype == dtype for x in tensors)):
        return tensors, []
    out, pairs = [], []
    for x in tensors:
        if fits(x):
            out.append(x)
        else:
            out.append(x.contiguous() if dtype is None else x.to(dtype, memory_format=torch.contiguous_format))
            pairs.append((x, out[-1]))
    return TensorList(out), pairs


def write_back(pairs: list[tuple[Tensor, Tensor]]) -> None:
    """Copy the stepped stand-ins of :func:`stand_ins` into the tensors they stood in for."""
    for tensor, copy in pairs:
        tensor.copy_(copy)


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


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the native and Triton kernels step


def for_dtypes(name: str, requested: str | None, tensors: list[Tensor]) -> str:
    """``name`` (:func:`resolve`'s choice for the device), or ``"torch"`` when ``"auto"`` chose a kernel
    backend that cannot step one of ``tensors``' dtypes (float64: only the torch reference computes in
    it). An explicitly requested backend stays, and refuses such a tensor with the reason."""
    requested = requested if requested is not None else os.environ.get("SPARSETRAIN_BACKEND", "auto")
    if name == "torch" or requested != "auto":
        return name
    return "torch" if any(t.dtype not in KERNEL_DTYPES for t in tensors) else name


def runs_on(name: str, device: torch.device) -> tuple[bool, str]:
    """(usable, reason) for backend ``name`` on tensors of ``device`` (the native build may lack CUDA)."""
    usable, reason = availability(name)
    if usable and name == "native":
        return module(name).supports(device)
    return usable, reason
