"""Selections a pruning event needs: the k-th smallest magnitude over many tensors, group scores.

The global threshold is found by a multi-tensor radix select on the float32 bit patterns of |w|
(monotone for non-negative floats): four passes of 8 bits, each a 256-bin histogram summed over
all tensors, processed in chunks, so extra memory is O(bins + chunk) and nothing is concatenated or
sorted. The result equals ``torch.kthvalue`` of the concatenated magnitudes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

CHUNK = 1 << 22  # elements per histogram pass over a tensor: bounds the temporaries (32 MiB)
_BITS = 8
_BINS = 1 << _BITS


def _magnitude_bits(x: Tensor) -> Tensor:
    return x.detach().reshape(-1).float().abs().view(torch.int32)


def kth_smallest_abs(tensors: Sequence[Tensor], k: int) -> float:
    """The k-th smallest |x| (1-based) over all elements of ``tensors``, by radix select."""
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} is outside [1, {total}]")
    prefix, remaining = 0, k
    for shift in (24, 16, 8, 0):
        high_mask = -(1 << (shift + _BITS)) if shift + _BITS < 32 else 0
        counts = None
        for t in tensors:
            bits = _magnitude_bits(t)
            for start in range(0, bits.numel(), CHUNK):
                chunk = bits[start : start + CHUNK]
                digit = (chunk >> shift) & (_BINS - 1)
                match = (chunk & high_mask) == prefix if high_mask else torch.ones_like(chunk, dtype=torch.bool)
                hist = torch.bincount(torch.where(match, digit, _BINS).long(), minlength=_BINS + 1)[:_BINS]
                counts = hist if counts is None else counts + hist.to(counts.device)
        cumulative = torch.cumsum(counts, 0).tolist()  # one small host read per pass
        digit = next(d for d, c in enumerate(cumulative) if c >= remaining)
        remaining -= cumulative[digit - 1] if digit > 0 else 0
        prefix |= digit << shift
    return torch.tensor(prefix, dtype=torch.int32).view(torch.float32).item()


def next_float32(value: float, toward: float) -> float:
    """The float32 neighbour of ``value`` in the direction of ``toward`` (thresholds compare in fp32)."""
    here = torch.tensor(value, dtype=torch.float32)
    return float(torch.nextafter(here, torch.tensor(toward, dtype=torch.float32)))


def prune_count(amount: float | int, size: int) -> int:
    """Number of units to prune, as torch.nn.utils.prune computes it (round for fractions)."""
    if isinstance(amount, int) and not isinstance(amount, bool):
        return amount
    return round(amount * size)


def group_scores(weight: Tensor, structure: str, norm: float = 1.0) -> Tensor:
    """Per-group L``norm`` norm: ``filters`` (dim 0) or ``channels`` (dim 1) of a weight."""
    w = weight.detach().float()
    if structure == "filters":
        return torch.linalg.vector_norm(w.reshape(w.shape[0], -1), ord=norm, dim=1)
    if structure == "channels":
        return torch.linalg.vector_norm(w.transpose(0, 1).reshape(w.shape[1], -1), ord=norm, dim=1)
    raise ValueError(f"unknown group structure {structure!r}; use 'filters' or 'channels'")


def group_layout(shape: torch.Size, structure: str | None) -> tuple[int, int]:
    """(groups G, inner) such that element i belongs to group (i // inner) % G."""
    numel = math.prod(shape)
    if structure is None:
        return 1, max(numel, 1)
    if len(shape) < 2:
        raise ValueError(f"group structure {structure!r} needs a weight with at least 2 dims, got shape {tuple(shape)}")
    if structure == "filters":
        return shape[0], numel // shape[0]
    if structure == "channels":
        return shape[1], math.prod(shape[2:])
    raise ValueError(f"unknown group structure {structure!r}; use 'filters' or 'channels'")


def expand_groups(values: Tensor, shape: torch.Size, structure: str | None) -> Tensor:
    """Broadcast a per-group vector to a tensor of ``shape``."""
    groups, inner = group_layout(shape, structure)
    index = (torch.arange(math.prod(shape), device=values.device) // inner) % groups
    return values[index].reshape(shape)
