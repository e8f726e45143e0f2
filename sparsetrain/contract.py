"""Layouts shared by every backend: per-tensor coefficients, statistics, group tables, prune modes.

Per prunable tensor ``t`` the fused step reads and writes (docs/design.md, "The fused step: per-element contract"):

* ``mask_words[t]``: int32 ``[ceil(numel / 32)]``, bit-packed (see :mod:`sparsetrain.masks`).
* ``tensor_coefs[t]``: float32 ``[NUM_COEFS]``, indexed by the ``COEF_*`` constants below.
* ``group_coefs[t]``: float32 ``[2, G]``; row ``GROUP_LAM`` is the per-group L2 coefficient (GReg),
  row ``GROUP_PRUNE`` is 1.0 where the group is flagged for pruning. Element ``i`` belongs to
  group ``(i // group_inner[t]) % G``.
* ``stats[t]``: float64 ``[NUM_STATS]``, overwritten every step with statistics of the updated,
  masked tensor, read at the next step (``STAT_*`` below). Reductions use a fixed order.

Selective decay's ``gbar`` is ``stats[STAT_SUM_ABS_G] / stats[STAT_ALIVE]`` of the previous step
(the term is zero while that is zero). Stochastic pruning at an event uses the previous step's
statistics: ``q = min(1, c * exp(-|w| / Tm))`` with ``Tm = stats[STAT_TM]`` and
``c = tensor_coefs[COEF_PRUNE_COUNT] / stats[STAT_SUM_KERNEL]``, so that the expected number of
weights pruned at the event is ``COEF_PRUNE_COUNT`` (up to the clamp at 1 and one step's drift).
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
NUM_COEFS = 8

STAT_ALIVE = 0
STAT_SUM_ABS_W = 1
STAT_SUM_KERNEL = 2
STAT_SUM_ABS_G = 3
STAT_TM = 4
NUM_STATS = 5

GROUP_LAM = 0
GROUP_PRUNE = 1

PRUNE_MODES = ("none", "stochastic", "low", "high", "group")
