"""Selections a pruning event needs: the k-th smallest magnitude over many tensors, group scores.

The global threshold is found by a multi-tensor radix select on the float32 bit patterns of |w|
(monotone for non-negative floats): four passes of 8 bits, each a 256-bin histogram summed over
all tensors, processed in chunks, so extra memory is O(bins + chunk) and nothing is concatenated or
sorted. The result equals ``torch.kthvalue`` of the concatenated magnitudes. Over DTensor shards
(FSDP2) the same exact value comes from one round of communication (see :func:`_kth_sharded`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import distributed
from .distributed import is_sharded, local

CHUNK = 1 << 22  # elements per histogram pass over a tensor: bounds the temporaries (32 MiB)
_PASSES = ((24, 8), (16, 8), (8, 8), (0, 8))  # (shift, bits) of the radix passes


def _magnitude_bits(x: Tensor) -> Tensor:
    return local(x).detach().reshape(-1).float().abs().view(torch.int32)


def kth_smallest_abs(tensors: Sequence[Tensor], k: int, *, sync: distributed.ShardSync | None = None) -> float:
    """The k-th smallest |x| (1-based) over all elements of ``tensors``, by radix select."""
    return kth_smallest_abs_many([tensors], [k], sync=sync)[0]


def kth_smallest_abs_many(
    selections: Sequence[Sequence[Tensor]],
    ks: Sequence[int],
    *,
    sync: distributed.ShardSync | None = None,
    k_offsets: Sequence[Tensor] | None = None,
) -> list[float | None]:
    """:func:`kth_smallest_abs` of several independent selections at once, pass by pass.

    With DTensor shards (FSDP2) the selections cost ONE collective in all (see :func:`_kth_sharded`),
    with any pending statistics of the optimizer (``sync``, its :class:`~sparsetrain.distributed.ShardSync`)
    riding along; the result is exactly that of one process. ``k_offsets``: per selection, a
    local count (a tensor) summed across ranks in that same collective and added to k (one
    process: added as is); a selection whose k then falls outside ``[1, numel]`` gives None.
    """
    if len(selections) != len(ks):
        raise ValueError(f"{len(selections)} selections but {len(ks)} values of k")
    totals = [sum(t.numel() for t in tensors) for tensors in selections]
    if k_offsets is None:
        for k, total in zip(ks, totals):
            if not 1 <= k <= total:
                raise ValueError(f"k={k} is outside [1, {total}]")
    sync = _sync_for([t for ts in selections for t in ts], sync)
    if sync is not None:
        return _kth_sharded(selections, ks, totals, sync, k_offsets)
    if k_offsets is not None:
        ks = [k + int(offset) for k, offset in zip(ks, k_offsets)]
    inside = [i for i, (k, total) in enumerate(zip(ks, totals)) if 1 <= k <= total]
    found = _radix_select([selections[i] for i in inside], [ks[i] for i in inside], _PASSES, [0] * len(inside))
    out: list[float | None] = [None] * len(ks)
    for i, value in zip(inside, found):
        out[i] = value
    return out


def _histogram(tensors: Sequence[Tensor], shift: int, bits: int, prefix: int) -> Tensor:
    """Counts of the ``bits``-bit digit at ``shift`` of the local |x| bit patterns sharing ``prefix``'s higher bits."""
    bins = 1 << bits
    high_mask = -(1 << (shift + bits)) if shift + bits < 32 else 0
    counts = torch.zeros(bins, dtype=torch.int64, device=local(tensors[0]).device)
    for t in tensors:
        flat = _magnitude_bits(t)
        for start in range(0, flat.numel(), CHUNK):
            chunk = flat[start : start + CHUNK]
            digit = (chunk >> shift) & (bins - 1)
            match = (chunk & high_mask) == prefix if high_mask else torch.ones_like(chunk, dtype=torch.bool)
            hist = torch.bincount(torch.where(match, digit, bins).long(), minlength=bins + 1)[:bins]
            counts += hist.to(counts.device)
    return counts


def _radix_select(selections, ks, passes, prefixes, sync=None) -> list[float]:
    """Radix passes from ``prefixes`` (the bits already known) down; histograms summed by ``sync`` per pass."""
    prefixes, remaining = list(prefixes), list(ks)
    for shift, bits in passes:
        histograms = [_histogram(tensors, shift, bits, prefix) for tensors, prefix in zip(selections, prefixes)]
        if sync is not None:
            sync.reduce(histograms)
        for index, counts in enumerate(histograms):
            cumulative = torch.cumsum(counts, 0)
            digit = int(torch.searchsorted(cumulative, remaining[index]))  # first bin reaching k: one host read
            remaining[index] -= int(cumulative[digit - 1]) if digit > 0 else 0
            prefixes[index] |= digit << shift
    return [torch.tensor(prefix, dtype=torch.int32).view(torch.float32).item() for prefix in prefixes]


COARSE_BITS = 15  # |x| bit patterns have a zero sign bit: the top 16 bits take 2**15 values
CANDIDATES = 16384  # per selection: local values sent with the coarse histogram, shared by the ranks


def _capacity(world: int) -> int:
    """Candidate slots of each rank per selection (the buffer stays :data:`CANDIDATES` long up to 32 ranks)."""
    return max(512, CANDIDATES // world)


def _window(counts: Tensor, rank: int, capacity: int) -> tuple[int, int]:
    """Bins ``[lo, hi]`` around local rank ``rank`` (1-based) holding at most ``capacity`` values."""
    cumulative = torch.cumsum(counts, 0)
    total = int(cumulative[-1]) if counts.numel() else 0
    if total == 0:
        return 1, 0
    bin_of = lambda r: int(torch.searchsorted(cumulative, min(max(r, 1), total)))  # noqa: E731
    lo, hi = bin_of(rank - capacity // 2), bin_of(rank + capacity // 2)
    size = lambda a, b: int(cumulative[b]) - (int(cumulative[a - 1]) if a > 0 else 0) if a <= b else 0  # noqa: E731
    for a, b in ((lo, hi), (lo, hi - 1), (lo + 1, hi), (lo + 1, hi - 1)):
        if size(a, b) <= capacity:
            return a, b
    return 1, 0  # pragma: no cover (the inner bins hold fewer than capacity ranks)


def _kth_sharded(selections, ks, totals, sync, k_offsets) -> list[float | None]:
    """Exact k-th values over DTensor shards in ONE collective (a second only where it cannot be).

    One summed buffer per call carries, per selection, the histogram of the top 16 bits of |x|
    (``2**15`` bins) and, in each rank's own slots, that rank's local values of the bins around its
    estimate of the k-th value (the bins around local rank ``k * local / total``, whole bins, at
    most :func:`_capacity` values). The summed histogram names the bin of the k-th value and its
    rank inside that bin; when the candidates in that bin are as many as the histogram counts
    there (every rank sent that bin whole or holds nothing in it: always so for small shards, and
    in practice for shards of one distribution), the k-th value is read off them. Otherwise one
    more round sums the histograms of the low 16 bits inside that bin (the exact radix select's
    second pass).
    """
    bins = 1 << COARSE_BITS
    world, rank = sync.world_size, dist.get_rank(sync.group)
    capacity = _capacity(world)
    width = 1 + bins + world * capacity
    payloads = []
    for index, tensors in enumerate(selections):
        counts = _histogram(tensors, 16, COARSE_BITS, 0)
        numel = sum(local(t).numel() for t in tensors)
        lo, hi = _window(counts, round(ks[index] * numel / max(totals[index], 1)), capacity)
        picked = [bits[((bits >> 16) >= lo) & ((bits >> 16) <= hi)] for bits in map(_magnitude_bits, tensors)]
        picked = torch.cat(picked).to(torch.float64).cpu() if picked else torch.zeros(0, dtype=torch.float64)
        payload = torch.zeros(width, dtype=torch.float64)
        if k_offsets is not None:
            payload[0] = float(k_offsets[index])
        payload[1 : 1 + bins] = counts.double().cpu()
        first = 1 + bins + rank * capacity
        payload[first : first + picked.numel()] = picked + 1  # 0 marks an empty slot
        payloads.append(payload)
    summed = torch.cat(payloads)
    sync.reduce([summed])
    out: list[float | None] = [None] * len(selections)
    unresolved = []
    for index in range(len(selections)):
        part = summed[index * width : (index + 1) * width]
        k = ks[index] + int(part[0]) if k_offsets is not None else ks[index]
        if not 1 <= k <= totals[index]:
            continue
        counts = part[1 : 1 + bins].long()
        cumulative = torch.cumsum(counts, 0)
        top = int(torch.searchsorted(cumulative, k))
        remaining = k - (int(cumulative[top - 1]) if top > 0 else 0)
        values = part[1 + bins :]
        values = values[values > 0] - 1
        inside = values[torch.div(values, 1 << 16, rounding_mode="floor") == top]
        if inside.numel() == int(counts[top]):  # every value of that bin was sent
            pattern = int(torch.sort(inside).values[remaining - 1])
            out[index] = torch.tensor(pattern, dtype=torch.int32).view(torch.float32).item()
        else:
            unresolved.append((index, remaining, top << 16))
    if unresolved:
        found = _radix_select(
            [selections[i] for i, _, _ in unresolved],
            [remaining for _, remaining, _ in unresolved],
            ((0, 16),),
            [prefix for _, _, prefix in unresolved],
            sync,
        )
        for (index, _, _), value in zip(unresolved, found):
            out[index] = value
    return out


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
