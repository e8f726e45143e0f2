"""Statistics only when consumed: which statistics a fused optimizer step computes, and whether it reads them.

A step computes, per statistic (bits ``contract.STATS_*``), only what a later step reads: the attached
Pruner's method says which statistics its next step reads (:meth:`~sparsetrain.Pruner.stats_to_compute`,
from :meth:`~sparsetrain.methods.Method.stats_read`), selective decay reads the alive count and the |g|
sum on every step, and without a Pruner every statistic is computed (nothing says which are read).
"""

from __future__ import annotations

from typing import Any

from ..contract import STATS_ALIVE, STATS_ALL, STATS_SUM_ABS_G


def wanted(optimizer: Any, prune: str) -> tuple[bool, int]:
    """``(read, compute)`` for the coming step of ``optimizer`` with pending decision ``prune``.

    ``compute``: the bit set of statistics the step computes (the op's ``stats_mask``; 0: none);
    ``read``: whether the op gets the statistics at all (it reads the previous step's when it computes
    any, for a stochastic event, and for selective decay).
    """
    pruner = optimizer.pruner
    compute = STATS_ALL if pruner is None else pruner.stats_to_compute()
    if optimizer.uses_sd:  # the decay term reads the previous step's mean |g| on every step
        compute |= STATS_ALIVE | STATS_SUM_ABS_G
    return bool(compute) or prune == "stochastic", compute
