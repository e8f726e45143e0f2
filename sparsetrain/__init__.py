"""sparsetrain: regularization-driven pruning fused into the optimizer step.

``import sparsetrain`` imports torch only; Triton and compiled extensions load when a backend
that needs them is first used.
"""

from . import backends, contract, masks, methods, ops, optim, philox, shrink
from .backends import BackendUnavailableError
from .pruner import Pruner

__version__ = "0.1.0"

# Submodules reached as attributes (``sparsetrain.autograd.MaskedPruner``, ``sparsetrain.export.size_report``)
# and imported on first use, so that ``import sparsetrain`` stays light.
_LAZY = ("autograd", "coupled", "distributed", "export", "metrics", "nm", "plots", "selection", "summary", "validation")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
