"""Drop-in fused optimizers: torch.optim's arguments and results, plus pruning in the same pass."""

from .adam import Adam, AdamW
from .base import FusedOptimizer
from .dead import rezero_pruned
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "FusedOptimizer", "rezero_pruned"]
