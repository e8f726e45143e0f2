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

from . import distributed
from .distributed import is_sharded, local

CHUNK = 1 << 22  # elements per histogram pass over a tensor: bounds the temporaries (32 MiB)
_PASSES = ((24, 8), (16, 8), (8, 8), (0, 8))  # (shift, bits) of the radix passes
_WIDE_PASSES = ((16, 16), (0, 16))  # across ranks: fewer rounds of communication, bigger histograms


def _magnitude_bits(x: Tensor) -> Tensor:
    return local(x).detach().reshape(-1).float().abs().view(torch.int32)


def kth_smallest_abs(tensors: Sequence[Tensor], k: int, *, sync: distributed.ShardSync | None = None) -> float:
    """The k-th smallest |x| (1-based) over all elements of ``tensors``, by radix select."""
    return kth_smallest_abs_many([tensors], [k], sync=sync)[0]


def kth_smallest_abs_many(
    selections: Sequence[Sequence[Tensor]], ks: Sequence[int], *, sync: distributed.ShardSync | None = None
) -> list[float]:
    """:func:`kth_smallest_abs` of several independent selections at once, pass by pass.

    With DTensor shards (FSDP2) every rank histograms its local shards and each pass sums all the
    selections' histograms across ranks in one collective (with any pending statistics of the
    optimizer riding along); the passes are then two of 16 and 15 bits instead of four of 8 bits,
    so the whole call costs two collectives. The result is exactly that of one process. ``sync``:
    the optimizer's :class:`~sparsetrain.distributed.ShardSync` (its pending statistics share the
    first round).
    """
    if len(selections) != len(ks):
        raise ValueError(f"{len(selections)} selections but {len(ks)} values of k")
    for tensors, k in zip(selections, ks):
        total = sum(t.numel() for t in tensors)
        if not 1 <= k <= total:
            raise ValueError(f"k={k} is outside [1, {total}]")
    sync = _sync_for([t for ts in selections for t in ts], sync)
    passes = _WIDE_PASSES if sync is not None else _PASSES
    prefixes, remaining = [0] * len(ks), list(ks)
    for shift, bits in passes:
        bins = 1 << bits
        high_mask = -(1 << (shift + bits)) if shift + bits < 32 else 0
        histograms = []
        for tensors, prefix in zip(selections, prefixes):
            counts = torch.zeros(bins, dtype=torch.int64, device=local(tensors[0]).device)
            for t in tensors:
                flat = _magnitude_bits(t)
                for start in range(0, flat.numel(), CHUNK):
                    chunk = flat[start : start + CHUNK]
                    digit = (chunk >> shift) & (bins - 1)
                    match = (chunk & high_mask) == prefix if high_mask else torch.ones_like(chunk, dtype=torch.bool)
                    hist = torch.bincount(torch.where(match, digit, bins).long(), minlength=bins + 1)[:bins]
                    counts += hist.to(counts.device)
            histograms.append(counts)
        if sync is not None:
            sync.reduce(histograms)
        for index, counts in enumerate(histograms):
            cumulative = torch.cumsum(counts, 0)
            digit = int(torch.searchsorted(cumulative, remaining[index]))  # first bin reaching k: one host read
            remaining[index] -= int(cumulative[digit - 1]) if digit > 0 else 0
            prefixes[index] |= digit << shift
    return [torch.tensor(prefix, dtype=torch.int32).view(torch.float32).item() for prefix in prefixes]


def _sync_for(tensors: Sequence[Tensor], sync: distributed.ShardSync | None) -> distributed.ShardSync | None:
    """``sync``, or a fresh one for DTensor inputs; None for plain tensors (nothing to communicate)."""
    if not any(is_sharded(t) for t in tensors):
        return None
    return sync if sync is not None else distributed.ShardSync(distributed.group_of(list(tensors)))


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
    if structure == "filters":  # explicit sizes: an FSDP2 shard may have no rows
        return torch.linalg.vector_norm(w.reshape(w.shape[0], math.prod(w.shape[1:])), ord=norm, dim=1)
    if structure == "channels":
        per_channel = w.shape[0] * math.prod(w.shape[2:])
        return torch.linalg.vector_norm(w.transpose(0, 1).reshape(w.shape[1], per_channel), ord=norm, dim=1)
    raise ValueError(f"unknown group structure {structure!r}; use 'filters' or 'channels'")


def group_scores_many(
    weights: Sequence[Tensor], structure: str, norm: float = 1.0, *, sync: distributed.ShardSync | None = None
) -> list[Tensor]:
    """:func:`group_scores` of several weights; DTensor shards are scored in one collective.

    Filters of a ``Shard(0)`` weight lie whole on one rank, so their norms are computed there and
    summed with zeros from the other ranks: the same values as one process. Groups spread over
    ranks (``channels``) sum float64 partial ``|w|**norm`` sums, then take the root.
    """
    sync = _sync_for(weights, sync)
    if sync is None:
        return [group_scores(w, structure, norm) for w in weights]
    partials = []
    for w in weights:
        shard = local(w).detach().float()
        if structure == "filters":
            scores = torch.zeros(w.shape[0], dtype=torch.float64, device=shard.device)
            first = distributed.shard_offset(w) // max(1, math.prod(w.shape[1:]))
            scores[first : first + shard.shape[0]] = group_scores(shard, structure, norm).double()
        elif structure == "channels":
            per_channel = shard.shape[0] * math.prod(shard.shape[2:])
            scores = shard.double().abs().pow(norm).transpose(0, 1).reshape(w.shape[1], per_channel).sum(dim=1)
        else:
            raise ValueError(f"unknown group structure {structure!r}; use 'filters' or 'channels'")
        partials.append(scores)
    sync.reduce(partials)
    if structure == "filters":
        return [p.float() for p in partials]
    return [p.pow(1.0 / norm).float() for p in partials]


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
