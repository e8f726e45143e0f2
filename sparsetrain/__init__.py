"""sparsetrain: regularization-driven pruning fused into the optimizer step.

``import sparsetrain`` imports torch only; Triton and compiled extensions load when a backend
that needs them is first used.
"""

from . import backends, contract, masks, methods, ops, optim, philox, shrink
from .backends import BackendUnavailableError
from .pruner import Pruner

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "Pruner",
    "methods",
    "backends",
    "contract",
    "masks",
    "ops",
    "optim",
    "philox",
    "shrink",
    "__version__",
]
