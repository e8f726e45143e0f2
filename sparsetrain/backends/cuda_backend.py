"""The CUDA C++ backend: kernels compiled from ``csrc/`` into ``sparsetrain._C``.

No CUDA kernels ship in this version, so the backend reports why it cannot run; the registry
and the ops are ready for it (``available``, ``sgd_step``, ``adam_step``).
"""

from __future__ import annotations

import importlib.util

_NOT_BUILT = (
    "the CUDA extension sparsetrain._C is not built: this version ships no csrc/ kernels yet "
    "(use backend='triton' on CUDA tensors, or 'torch' anywhere)"
)


def available() -> tuple[bool, str]:
    if importlib.util.find_spec("sparsetrain._C") is None:
        return False, _NOT_BUILT
    return False, "sparsetrain._C is present but this version has no CUDA backend binding for it"


def sgd_step(*args, **kwargs) -> None:
    raise RuntimeError(available()[1])


adam_step = sgd_step
