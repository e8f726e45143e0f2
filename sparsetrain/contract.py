"""Layouts shared by every backend: per-tensor coefficients, statistics, group tables, prune modes.

Per prunable tensor ``t`` the fused step reads and writes (docs/design.md, "The fused step: per-element contract"):

* ``mask_words[t]``: int32 ``[ceil(numel / 32)]``, bit-packed (see :mod:`sparsetrain.masks`).
* ``tensor_coefs[t]``: float32 ``[NUM_COEFS]``, indexed by the ``COEF_*`` constants below.
* ``group_coefs[t]``: float32 ``[2, G]``; row ``GROUP_LAM`` is the per-group L2 coefficient (GReg),
  row ``GROUP_PRUNE`` is 1.0 where the group is flagged for pruning. Element ``i`` belongs to
  group ``(i // group_inner[t]) % G``.
* ``stats[t]``: float64 ``[NUM_STATS]``, overwritten by a step that computes statistics with those
  of the updated, masked tensor, read at the next step (``STAT_*`` below). Reductions use a fixed
  order, in float64. Which statistics a step computes is the ops' ``stats_mask`` (bits ``STATS_*``
  below, ``1 << STAT_*``; ``write_stats=False`` computes none): a step that computes some overwrites
  the whole vector, the statistics it computes with this step's sums and every other one with 0
  (``STAT_TM`` goes with ``STAT_SUM_KERNEL``: 0 when that is not computed), so the vector always
  describes one step, stays valid (finite, non-negative) and sums exactly across ranks. A step that
  computes none leaves the vector as it was (the previous step's, which it may read).

Selective decay's ``gbar`` is ``stats[STAT_SUM_ABS_G] / stats[STAT_ALIVE]`` of the previous step
(the term is zero while that is zero). Stochastic pruning at an event uses the previous step's
statistics: ``q = min(1, c * exp(-|w| / Tm))`` with ``Tm = stats[STAT_TM]`` and
``c = tensor_coefs[COEF_PRUNE_COUNT] / stats[STAT_SUM_KERNEL]``, so that the expected number of
weights pruned at the event is ``COEF_PRUNE_COUNT`` (up to the clamp at 1 and one step's drift).
N:M pruning (``prune="nm"``, pattern ``tensor_coefs[COEF_NM] = nm_code(n, m)``) cuts the flat
tensor into groups of ``M`` consecutive elements (global indices ``[g*M, (g+1)*M)``; for a weight
viewed as ``[out, in*...]`` with a row length divisible by ``M`` these are ``M`` consecutive weights
of one row, along the input dimension) and keeps, of each group, the live elements whose rank is
below ``N``, ranking on the updated weight: element ``j``'s rank is the number of live elements
``k`` of its group with ``|w_k| > |w_j|``, or ``|w_k| == |w_j|`` and ``k < j`` (ties go to the lower
index). Dead elements stay dead and are never counted, so a group keeps ``min(N, live)`` elements:
exactly ``N`` of every ``M`` when it had at least ``N`` live ones.

Each step's ``STAT_SUM_KERNEL`` is accumulated with ``Tm = temperature * mean|w|`` of the previous
step, which is stored beside it as ``STAT_TM``.
"""

from __future__ import annotations

COEF_L2 = 0
COEF_L1 = 1
COEF_SD = 2
COEF_SD_BETA = 3
COEF_THRESHOLD = 4
COEF_PRUNE_COUNT = 5
COEF_TEMPERATURE = 6
COEF_NM = 7
NUM_COEFS = 8

STAT_ALIVE = 0
STAT_SUM_ABS_W = 1
STAT_SUM_KERNEL = 2
STAT_SUM_ABS_G = 3
STAT_TM = 4
NUM_STATS = 5

# Bit sets of statistics (the ops' ``stats_mask``, ``Method.stats_read``): bit ``1 << STAT_*`` per
# summed statistic; computing STAT_SUM_KERNEL also stores the scale it used in STAT_TM.
STATS_NONE = 0
STATS_ALIVE = 1 << STAT_ALIVE
STATS_SUM_ABS_W = 1 << STAT_SUM_ABS_W
STATS_SUM_KERNEL = 1 << STAT_SUM_KERNEL
STATS_SUM_ABS_G = 1 << STAT_SUM_ABS_G
STATS_ALL = STATS_ALIVE | STATS_SUM_ABS_W | STATS_SUM_KERNEL | STATS_SUM_ABS_G

GROUP_LAM = 0
GROUP_PRUNE = 1

PRUNE_MODES = ("none", "stochastic", "low", "high", "group", "nm")

NM_GROUP_SIZES = (2, 4, 8, 16, 32)
"""The group sizes ``M`` of N:M pruning: powers of two up to 32, so that a group never straddles a mask word."""


def stats_computed(write_stats: bool, stats_mask: int) -> int:
    """The statistics an op call computes: ``stats_mask`` (bits ``STATS_*``) when ``write_stats``, else none.

    Raises ``ValueError`` for a ``stats_mask`` that is not an integer bit set of ``STATS_ALL``.
    """
    if isinstance(stats_mask, bool) or not isinstance(stats_mask, int) or stats_mask & ~STATS_ALL or stats_mask < 0:
        raise ValueError(
            f"stats_mask must be an int bit set of contract.STATS_* (0 to {STATS_ALL}), got {stats_mask!r}"
        )
    return stats_mask if write_stats else STATS_NONE


def nm_code(n: int, m: int) -> float:
    """The value of ``tensor_coefs[COEF_NM]`` for an N:M pattern (``m * 64 + n``, exact in float32)."""
    if m not in NM_GROUP_SIZES:
        raise ValueError(f"N:M pruning: M must be one of {NM_GROUP_SIZES}, got {m!r}")
    if not (isinstance(n, int) and 1 <= n < m):
        raise ValueError(f"N:M pruning: N must be an integer with 1 <= N < M = {m}, got {n!r}")
    return float(m * 64 + n)


def nm_pattern(code: float) -> tuple[int, int]:
    """``(n, m)`` from ``tensor_coefs[COEF_NM]``; raises ``ValueError`` when no pattern is set there."""
    value = int(code)
    n, m = value % 64, value // 64
    if value != code or m not in NM_GROUP_SIZES or not 1 <= n < m:
        raise ValueError(
            f"prune='nm' needs an N:M pattern in tensor_coefs[COEF_NM] (contract.nm_code(n, m)), got {code!r}"
        )
    return n, m
