"""Scans of tensor lists on the step's host path, one call per list.

A fused step reads a few properties of every parameter and gradient (the gradient itself, its dtype,
shape, device, layout and contiguity, data pointers, version counters). Read attribute by attribute
in Python this costs a few hundred nanoseconds per tensor, for a few hundred tensors more than the
step's kernels take on a GPU. The native extension (``sparsetrain._C``, ``csrc/host_scan.cpp``) reads
them in one C++ pass per list; without it (or with an extension built before these functions
existed) the Python fallbacks here compute the same results. Both give identical answers: tensor
subclasses and active torch function modes are read through Python attributes by the C++ side too.
"""

from __future__ import annotations

import importlib
import operator
from array import array
from collections.abc import Sequence
from functools import cache
from types import ModuleType

import torch
from torch import Tensor

_FUNCTIONS = (
    "grads",
    "versions",
    "data_ptrs",
    "all_contiguous",
    "event_seeds",
    "copy_elements",
    "gather_elements",
    "items_are",
    "attrs_equal",
)


@cache
def native() -> ModuleType | None:
    """The extension module when it is importable and has the host-path functions (the scans here and
    :func:`sparsetrain.philox.event_seeds`'s), else ``None`` (Python fallbacks)."""
    try:
        module = importlib.import_module("sparsetrain._C")
    except ImportError:
        return None
    return module if all(hasattr(module, name) for name in _FUNCTIONS) else None


def grads(lists: Sequence[Sequence[Tensor]]) -> tuple[list[Tensor | None], bytes, bytes, bool]:
    """``(grads, presence, ids, plain)`` for the tensors of ``lists`` (e.g. each param group's ``params``), in order.

    ``grads``: each tensor's ``.grad`` (``None`` when absent). ``presence``: one byte per tensor, 1 where
    it has a gradient. ``ids``: the tensors' ``id()`` as native unsigned 64-bit integers, so that a
    tensor replaced by another object changes it. ``plain`` is ``True`` only when every present
    gradient was checked and found in the common case: parameter and gradient exact ``torch.Tensor`` /
    ``nn.Parameter`` objects, dense and contiguous, of one dtype (fp32, bf16 or fp16), one shape and
    one device. ``False`` says nothing (the Python fallback checks nothing): the caller then runs its
    full checks (:func:`sparsetrain.validation.step_tensors`).
    """
    module = native()
    if module is not None:
        return module.grads(lists)
    tensors = [t for ts in lists for t in ts]
    found = [t.grad for t in tensors]
    return found, bytes(g is not None for g in found), array("Q", map(id, tensors)).tobytes(), False


def versions(tensors: Sequence[Tensor]) -> bytes:
    """The tensors' version counters (``t._version``, bumped by in-place writes) as native int64
    bytes: compared in one ``==``; :func:`decode` gives the integers."""
    module = native()
    if module is not None:
        return module.versions(tensors)
    return array("q", [t._version for t in tensors]).tobytes()


def data_ptrs(tensors: Sequence[Tensor]) -> bytes:
    """The tensors' ``data_ptr()`` as native uint64 bytes: compared in one ``==``; :func:`decode`
    gives the integers."""
    module = native()
    if module is not None:
        return module.data_ptrs(tensors)
    return array("Q", [t.data_ptr() for t in tensors]).tobytes()


def decode(values: bytes, signed: bool = True) -> list[int]:
    """The integers of :func:`versions` (``signed``) or :func:`data_ptrs` (``signed=False``)."""
    return memoryview(values).cast("q" if signed else "Q").tolist()


def all_contiguous(tensors: list[Tensor]) -> bool:
    """``all(t.is_contiguous() for t in tensors)``."""
    module = native()
    return module.all_contiguous(tensors) if module is not None else all(t.is_contiguous() for t in tensors)


def copy_elements(dst: list[Tensor], src: Tensor, items: list[Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for every one-element tensor of ``dst``; ``items`` is ``list(src.unbind())``
    (kept by the caller with ``src``). CPU tensors: plain stores in C++ (per-tensor ``copy_`` calls cost
    more than the values); elsewhere, or without the extension, one ``torch._foreach_copy_``."""
    module = native()
    if module is None or not module.copy_elements(dst, src):
        torch._foreach_copy_(dst, items)


def gather_elements(dst: Tensor, src: list[Tensor]) -> bool:
    """``dst[i] = src[i]`` for one-element tensors ``src`` and a vector ``dst`` of their dtype, when all are
    CPU tensors and the extension is present: plain loads in C++ (a ``torch.stack`` costs more than the
    values). Returns ``False``, with nothing written, otherwise: the caller then gathers with torch."""
    module = native()
    return module is not None and module.gather_elements(dst, src)


def items_are(mappings: Sequence, key: object, expected: Sequence) -> bool:
    """``len(mappings) == len(expected) and all(m[key] is e for m, e in zip(mappings, expected))``
    (a missing key raises ``KeyError``)."""
    module = native()
    if module is not None:
        return module.items_are(mappings, key, expected)
    getter = operator.itemgetter(key)
    return len(mappings) == len(expected) and all(map(operator.is_, map(getter, mappings), expected))


def attrs_equal(objects: Sequence, name: str, values: Sequence) -> bool:
    """``[getattr(o, name) for o in objects] == list(values)`` (identity, then ``==``, item by item)."""
    module = native()
    if module is not None:
        return module.attrs_equal(objects, name, values)
    return list(map(operator.attrgetter(name), objects)) == list(values)
