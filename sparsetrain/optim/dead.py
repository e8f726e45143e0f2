"""Dead weights stay exactly +0.0, whatever is written into them between steps, on every backend.

A fused step never reads a dead (pruned) weight: the Triton kernel skips dead blocks and writes a
dead element back as it was read. A write from outside the optimizer (loading a dense checkpoint
into the model, ``fill_``, ``copy_``, another optimizer) would therefore survive on one backend and
not on another. Before each step the optimizer compares each masked parameter's version counter
(``Tensor._version``, bumped by every in-place write through autograd-visible tensors) with the
value it recorded after its last step, and zeroes the dead elements of the tensors that were
written since. A steady training loop pays one integer read per masked tensor per step.

Writes through ``.data`` or raw pointers bypass the version counter and are not detected: the
pruned elements they write stay in the model (on every backend) until :func:`rezero_pruned`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import masks as mask_format
from .. import scan


def versions(params: list[Tensor]) -> bytes:
    """The parameters' version counters, as :func:`sparsetrain.scan.versions` gives them."""
    return scan.versions(params)


def rezero_written(
    params: list[Tensor], recorded: bytes | None, state: Any, sources: list[Tensor] | None = None
) -> None:
    """Zero (+0.0) the dead elements of every tensor of ``params`` written since ``recorded``.

    ``sources``: the parameters whose state holds the masks when ``params`` are their local shards.
    """
    if torch.compiler.is_compiling():
        return
    now = versions(params)
    if now == recorded:
        return
    now = scan.decode(now)
    recorded = scan.decode(recorded) if recorded is not None else None
    with torch.no_grad():
        for index, p in enumerate(params):
            if recorded is None or now[index] != recorded[index]:
                owner = sources[index] if sources is not None else p
                alive = mask_format.unpack(state[owner]["mask_words"], p.numel(), p.shape)
                p.masked_fill_(~alive, 0.0)


def rezero_pruned(optimizer: Any) -> None:
    """Zero (+0.0) the pruned elements of every masked parameter of ``optimizer`` now.

    Needed only after a write the version counter does not see: ``p.data.copy_(...)``, ``p.data = ...``
    or a raw pointer. Writes through the parameter itself (``with torch.no_grad(): p.copy_(x)``,
    ``model.load_state_dict``) are zeroed by the next step without it. Also takes a
    ``MaskedPruner``'s ``optimizer`` (its masked originals).
    """
    from ..distributed import local

    with torch.no_grad():
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if "mask_words" in state:
                    shard = local(p)
                    alive = mask_format.unpack(state["mask_words"], shard.numel(), shard.shape)
                    shard.masked_fill_(~alive, 0.0)
