"""Pruning methods: host-side schedules that drive the fused step."""

from .base import Method
from .greg import GReg1, GReg2
from .magnitude import Magnitude
from .nm import NM
from .schedules import sparsity_at
from .selective import SelectiveDecay
from .stochastic import StochasticMagnitude

__all__ = ["Method", "GReg1", "GReg2", "Magnitude", "NM", "SelectiveDecay", "StochasticMagnitude", "sparsity_at"]
