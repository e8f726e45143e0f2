"""``torch.compile(opt.step)``: the whole step, pruning schedule included, as one opaque graph node.

A pruning step depends on host values that change every step: the pruner's step count, the
method's schedule, the prune mode, the event seeds, thresholds selected from the weights. Traced,
each of them would either be frozen into the graph as a constant (an event traced as
``prune='none'`` is dropped) or guarded on (one recompilation per step). So under
``torch.compile`` (``fullgraph=True`` included) :meth:`FusedOptimizer.step` is traced as a single
call of the custom op ``sparsetrain::optimizer_step_``, whose implementation runs, at run time,
exactly the eager step: the attached pruner's schedule, the fused ops, the event bookkeeping. The
graph holds no Python branch on a step count; prune mode and seeds are run-time values; one
compilation serves event and non-event steps, and weights and masks equal eager mode's.

The op takes the optimizer's handle and a one-element token tensor, the only tensor it declares
mutated; parameters and states are updated in place, as by the eager step. Nothing in the traced
region reads them after the step, so the declared token keeps the call in place and ordered.
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .base import FusedOptimizer

_OPTIMIZERS: dict[int, weakref.ref] = {}
_HANDLES = itertools.count(1)


def register(opt: FusedOptimizer) -> None:
    """Give ``opt`` its registry handle and token (at construction, outside any traced region)."""
    opt._compile_handle = next(_HANDLES)
    opt._compile_token = torch.zeros(1, dtype=torch.int64)
    _OPTIMIZERS[opt._compile_handle] = weakref.ref(opt, lambda _, h=opt._compile_handle: _OPTIMIZERS.pop(h, None))


@torch.library.custom_op("sparsetrain::optimizer_step_", mutates_args=("token",))
def optimizer_step_(token: Tensor, handle: int) -> None:
    """Run the eager step of the optimizer registered as ``handle`` (its pruner's schedule included)."""
    opt = _OPTIMIZERS[handle]()
    if opt is None:
        raise RuntimeError("sparsetrain::optimizer_step_: the optimizer of this compiled step no longer exists")
    pruner = opt.pruner
    skipped = pruner._pre_step() if pruner is not None else False
    opt._eager_step()
    if pruner is not None:
        pruner._post_step(skipped)
    token.add_(1)


@optimizer_step_.register_fake
def _(token: Tensor, handle: int) -> None:
    return None


def step(opt: FusedOptimizer) -> None:
    """What ``opt.step()`` traces to under ``torch.compile``."""
    optimizer_step_(opt._compile_token, opt._compile_handle)
