"""Shrink in flight: remove dead coupled channel groups from the live model, mid-training.

A filter pruned at step 500 is still multiplied by zero for the rest of a masked run.
:func:`shrink` (``pruner.shrink()``) removes, in place and in one call, every unit of the
pruner's channel groups (:mod:`sparsetrain.coupled`) whose member slices are all pruned:

* the model: one Torch-Pruning ``DependencyGraph.get_pruning_group(root, prune_out_channels,
  dead).prune()`` per channel group, on a graph traced from the live model (producers' rows and
  biases, BatchNorm entries and running statistics, consumers' input slices, residual partners);
* every parameter keeps its identity (the same ``nn.Parameter`` object, now smaller), so the
  optimizer's ``param_groups``, a learning-rate scheduler and any reference to the parameters keep
  working; ``.grad`` is sliced;
* the optimizer's per-parameter state: algorithm buffers (SGD's ``momentum_buffer``, Adam's
  ``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq``, any buffer shaped like the parameter in a
  torch.optim optimizer) are sliced; the bit-packed masks are unpacked, sliced and packed again;
  the per-group tables ``group_coefs`` ``[2, G]`` are sliced slot by slot and ``group_inner``
  recomputed; statistics and per-tensor coefficients stay (only pruned elements, which add nothing
  to them, are removed);
* the pruner: its channel groups are traced again on the smaller model (each remembers how many
  units it lost, so a schedule's counts continue on the original sizes), its targets and history
  follow, and the method remaps its own per-unit state (GReg's picked channels).

Removing only pruned slices whose outputs are exactly zero, the smaller model computes what the
masked one computes (up to summation order). Anything else is refused before anything changes:
unstructured methods, ``coupled=False`` groups, a compiled model, FSDP2 shards, a removed slice
that is still alive or is not a pruned target, optimizer state this module cannot slice, a layer
whose shape would change while it carries a parametrization of the model's own (``weight_norm``;
such layers that keep their shape, and their parametrizations, are left as they are), a weight
shared by several layers (tied weights) that the removal would not cut alike in every one of them.
A tied weight cut alike (parallel layers whose outputs are added) stays one Parameter.

Resuming: the pruner's state (in the optimizer's ``state_dict``) records every shrink.
:func:`rebuild` replays them on a freshly built dense model, which then loads the saved
``model.state_dict()``; build the optimizer and the pruner on it and load their state as usual.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import contract, distributed
from . import masks as mask_format
from .coupled import Removal, build_graph, is_mask, removals, remove_units, unwrap
from .optim.base import FusedOptimizer

if TYPE_CHECKING:
    from .pruner import Pruner

PRUNING_KEYS = ("mask_words", "stats", "coefs", "group_coefs", "group_inner", "step")


class ShrinkError(ValueError):
    """The model cannot be shrunk as asked; raised before anything is modified."""


def shrink(
    pruner: Pruner, *, optimizers: Sequence[torch.optim.Optimizer] = (), example_inputs: Any = None
) -> nn.Module:
    """Remove the pruner's dead channel groups from its live model and slice everything indexed by them.

    Args:
        pruner: a :class:`~sparsetrain.Pruner` or :class:`~sparsetrain.autograd.MaskedPruner` with
            a structured method on coupled channel groups (``coupled=True``, the default).
        optimizers: further optimizers holding the model's parameters whose state is sliced too
            (with a ``MaskedPruner``: your torch optimizer). The pruner's own optimizer always is.
        example_inputs: inputs to trace the model with (default: the pruner's ``example_inputs``).

    Returns:
        The model to train from now on: the pruner's model itself, or, when it is wrapped in
        ``DistributedDataParallel``, a new wrapper of the shrunk module with the same settings
        (every rank must call ``shrink`` at the same step; the ranks' masks are identical).

    Raises:
        ShrinkError: shrinking is not possible here (the reason is named); nothing is modified.
    """
    model = pruner.model
    inner = unwrap(model)
    _refuse(pruner, model, inner)
    owned = _optimizers(pruner, optimizers)
    plan = _plan(pruner)
    if not any(plan.values()):
        return model
    example = example_inputs if example_inputs is not None else pruner.trace_kwargs.get("example_inputs")
    if example is None:
        raise ShrinkError("shrink() traces the model: pass example_inputs= (the pruner was created without them)")
    stripped = _strip_masks(pruner, inner)
    try:
        graph = build_graph(inner, example)
        found = removals(inner, graph, plan)
        problem = found if isinstance(found, str) else _problem(pruner, found, owned)
        if problem is not None:
            raise ShrinkError(f"cannot shrink: {problem}; nothing was changed")
        dims = _grouped_dims(pruner)
        old_targets, old_groups = [t.name for t in pruner.targets], pruner.groups.groups
        grads = {id(r.param): _take(r.param.grad, r.kept()) if r.param.grad is not None else None for r in found}
        kept = {id(r.param): r.kept() for r in found}
        remove_units(inner, graph, plan)
        for r in found:
            _commit(r, kept[id(r.param)], grads[id(r.param)], owned, dims.get(id(r.param)))
        _retrace(pruner, inner, old_targets, old_groups, plan)
    finally:
        _restore_masks(pruner, stripped)
    pruner.method.units_removed(pruner, plan)
    pruner.shrinks.append({name: list(units) for name, units in plan.items() if units})
    for opt in owned:
        if isinstance(opt, FusedOptimizer):
            opt._layout_version += 1  # the step's tensor lists are rebuilt
    if isinstance(model, nn.parallel.DistributedDataParallel):
        pruner.model = _rewrap(model, inner)
    return pruner.model


def rebuild(model: nn.Module, state: Any, example_inputs: Any) -> nn.Module:
    """Replay the shrinks recorded in ``state`` on a freshly built (dense) ``model``, in place.

    ``state`` is an optimizer ``state_dict`` saved with a :class:`~sparsetrain.Pruner` attached,
    a ``MaskedPruner.state_dict()``, a ``pruner.state_dict()`` or the list ``pruner.shrinks``.
    Afterwards ``model`` has the saved shapes: load ``model.load_state_dict(saved)``, then build
    the optimizer and the pruner on it and load their states.

    Raises:
        ValueError: ``state`` records no shrink or names a layer the model does not have.
    """
    records = _records_of(state)
    inner = unwrap(model)
    modules = dict(inner.named_modules())
    missing = sorted({name for record in records for name in record if name not in modules})
    if missing:
        raise ValueError(f"the recorded shrinks remove channels of {missing[:4]}, which the model does not have")
    for record in records:
        graph = build_graph(inner, example_inputs)
        found = removals(inner, graph, record)
        if isinstance(found, str):
            raise ValueError(f"cannot replay the recorded shrink: {found}")
        remove_units(inner, graph, record)
        for r in found:  # tied weights, cut alike in every holder: one Parameter again
            for module, attr in r.tied:
                module._parameters[attr] = r.holder._parameters[r.attr]
    return model


# ------------------------------------------------------------------------------------ checks
def _refuse(pruner: Pruner, model: nn.Module, inner: nn.Module) -> None:
    method = type(pruner.method).__name__
    if pruner.groups is None:
        raise ShrinkError(
            f"shrink() removes coupled channel groups; {method} prunes unstructured weights (structure=None), "
            "which leaves nothing whole to remove"
        )
    if not pruner.trace_kwargs.get("coupled", True) or any(g.inputs for g in pruner.groups.groups):
        raise ShrinkError(
            "shrink() needs coupled channel groups (coupled=True with example_inputs=): with coupled=False a "
            "removed filter's consumers still read it, so the smaller model would compute something else"
        )
    if any(hasattr(m, "_orig_mod") for m in (model, inner)):  # torch.compile's OptimizedModule
        raise ShrinkError("shrink() cannot change a model under torch.compile: shrink the original module")
    if isinstance(model, nn.DataParallel):
        raise ShrinkError("shrink() does not re-wrap nn.DataParallel; use DistributedDataParallel")
    if any(distributed.is_sharded(p) for p in inner.parameters()):
        raise ShrinkError("shrink() does not reshard FSDP2 (DTensor) parameters")


def _optimizers(pruner: Pruner, optimizers: Iterable[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
    owned = [pruner.optimizer]
    for opt in optimizers:
        if not isinstance(opt, torch.optim.Optimizer):
            raise ShrinkError(f"optimizers= takes torch.optim.Optimizer objects, got {type(opt).__name__}")
        if all(opt is not o for o in owned):
            owned.append(opt)
    return owned


def _plan(pruner: Pruner) -> dict[str, list[int]]:
    """Per channel group (root layer name), the dead units."""
    return {
        g.name: [int(i) for i in torch.nonzero(~alive).flatten()]
        for g, alive in zip(pruner.groups.groups, pruner.alive_units())
    }


def _grouped_dims(pruner: Pruner) -> dict[int, tuple[int, int]]:
    """id(param) -> (lo, hi): the dims its group table spans."""
    dims: dict[int, list[int]] = {}
    for g in pruner.groups.groups:
        for m in g.members:
            dims.setdefault(id(m.param), []).append(m.dim)
    return {key: (min(v), max(v)) for key, v in dims.items()}


def _problem(pruner: Pruner, found: list[Removal], owned: list[torch.optim.Optimizer]) -> str | None:
    """Why the removals cannot be done (None when they can); reads only."""
    targets = {id(t.param): t.name for t in pruner.targets}
    dims = _grouped_dims(pruner)
    for r in found:
        name = targets.get(id(r.param))
        if name is None:
            return f"Torch-Pruning would cut {type(r.holder).__name__}.{r.attr}, which the pruner does not mask"
        mask = pruner.optimizer.mask(r.param)
        lo, hi = dims[id(r.param)]
        for dim, positions in r.removed.items():
            if not lo <= dim <= hi:
                return f"{name}: dim {dim} is cut, outside its channel groups' dims {lo}..{hi}"
            if bool(mask.index_select(dim, torch.tensor(positions, device=mask.device)).any()):
                return f"{name}: a slice Torch-Pruning would remove along dim {dim} is still alive"
        for opt in owned:
            for key, value in opt.state.get(r.param, {}).items():
                fused = isinstance(opt, FusedOptimizer)
                if fused and key in PRUNING_KEYS or not isinstance(value, Tensor) or value.dim() == 0:
                    continue
                if value.shape != r.param.shape:
                    return (
                        f"{name}: {type(opt).__name__} state {key!r} has shape {tuple(value.shape)}, "
                        f"not the parameter's {tuple(r.param.shape)}; shrink() cannot slice it"
                    )
    return None


# ------------------------------------------------------------------------------------ slicing
def _take(t: Tensor, kept: dict[int, Tensor]) -> Tensor:
    for dim, index in kept.items():
        t = t.index_select(dim, index.to(t.device))
    return t.contiguous()


def _commit(
    r: Removal,
    kept: dict[int, Tensor],
    grad: Tensor | None,
    owned: list[torch.optim.Optimizer],
    dims: tuple[int, int] | None,
) -> None:
    """Give the old Parameter object Torch-Pruning's smaller tensor, and slice its grad and state."""
    param, old_shape = r.param, tuple(r.param.shape)
    new = r.holder._parameters[r.attr]
    expected = list(old_shape)
    for dim, index in kept.items():
        expected[dim] = len(index)
    if list(new.shape) != expected:
        raise RuntimeError(f"Torch-Pruning gave {type(r.holder).__name__}.{r.attr} shape {tuple(new.shape)}, "
                           f"expected {tuple(expected)}; the model is modified")  # fmt: skip
    with torch.no_grad():
        # set_data keeps a live gradient accumulator (with the old shape, held by any graph still
        # alive, e.g. the last loss) unless the type changes: pass through another dtype to drop it
        param.data = new.detach().to(torch.float32 if new.dtype == torch.float64 else torch.float64)
        param.data = new.detach()
    for module, attr in r.tied:  # tied weights: every holder was cut alike; they share the old Parameter again
        if not torch.equal(module._parameters[attr], new):
            raise RuntimeError(f"Torch-Pruning cut the holders of {r.attr} differently; the model is modified")
        module._parameters[attr] = param
    r.holder._parameters[r.attr] = param
    param.grad = grad
    for opt in owned:
        state = opt.state.get(param)
        if not state:
            continue
        fused = isinstance(opt, FusedOptimizer)
        for key, value in list(state.items()):
            if fused and key == "mask_words":
                alive = mask_format.unpack(value, math.prod(old_shape), old_shape)
                state[key] = mask_format.pack(_take(alive, kept))
            elif fused and key == "group_coefs" and dims is not None:
                lo, hi = dims
                table = value.reshape(2, *old_shape[lo : hi + 1])
                shifted = {d - lo + 1: index for d, index in kept.items()}
                state[key] = _take(table, shifted).reshape(2, -1)
            elif fused and key == "group_inner" and dims is not None:
                state[key] = math.prod(expected[dims[1] + 1 :])
            elif fused and key in PRUNING_KEYS:
                continue  # statistics and coefficients: the removed elements were pruned, they add nothing
            elif isinstance(value, Tensor) and tuple(value.shape) == old_shape and value.dim() > 0:
                state[key] = _take(value, kept)
        if fused and "stats" in state and "mask_words" in state:  # steps that consume none leave them stale
            with torch.no_grad():
                alive = mask_format.unpack(state["mask_words"], param.numel(), param.shape)
                state["stats"][contract.STAT_ALIVE] = alive.sum()
                state["stats"][contract.STAT_SUM_ABS_W] = (param.detach().double().abs() * alive).sum()


def _retrace(pruner: Pruner, inner: nn.Module, old_targets: list[str], old_groups: list, plan) -> None:
    """The pruner's channel groups, targets and history for the smaller model."""
    from .pruner import resolve_targets

    kwargs = dict(pruner.trace_kwargs)
    targets, groups = resolve_targets(inner, pruner.method, **kwargs)
    if [g.name for g in groups.groups] != [g.name for g in old_groups] or [t.name for t in targets] != old_targets:
        raise RuntimeError("the shrunk model's channel groups differ from the masked model's; the model is modified")
    for new, old in zip(groups.groups, old_groups):
        new.removed = old.removed + len(plan.get(old.name, []))
    for t in targets:
        state = pruner.optimizer.state[t.param]
        if tuple(state["group_coefs"].shape) != (2, t.groups) or state["group_inner"] != t.inner:
            raise RuntimeError(f"{t.name}: the sliced group table does not fit the new layout; the model is modified")
    pruner.targets, pruner.groups = targets, groups
    pruner.history.targets = [t for t in targets if t.param.dim() >= 2]


def _rewrap(model: nn.parallel.DistributedDataParallel, inner: nn.Module) -> nn.parallel.DistributedDataParallel:
    """A new DistributedDataParallel around the shrunk module, with the old wrapper's settings."""
    return nn.parallel.DistributedDataParallel(
        inner,
        device_ids=model.device_ids,
        output_device=model.output_device,
        dim=model.dim,
        broadcast_buffers=model.broadcast_buffers,
        process_group=model.process_group,
        bucket_cap_mb=model.bucket_bytes_cap / (1024 * 1024),
        find_unused_parameters=model.find_unused_parameters,
        gradient_as_bucket_view=model.gradient_as_bucket_view,
        static_graph=model.static_graph,
    )


# ------------------------------------------------------------------------------------ MaskedPruner
def _strip_masks(pruner: Pruner, inner: nn.Module) -> list[tuple[nn.Module, str, Any]]:
    """Remove a MaskedPruner's mask parametrizations (the originals stay the same Parameters).

    The model's own parametrizations (``weight_norm``, ...) stay; :func:`~sparsetrain.coupled.removals`
    refuses a layer carrying one whose shape would change.
    """
    stripped = []
    for module in list(inner.modules()):
        plists = module._modules.get("parametrizations")
        if plists is None:
            continue
        for attr in list(plists.keys()):
            if not all(map(is_mask, plists[attr])):
                continue
            stripped.append((module, attr, plists[attr][0]))
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
    return stripped


def _restore_masks(pruner: Pruner, stripped: list[tuple[nn.Module, str, Any]]) -> None:
    for module, attr, parametrization in stripped:
        parametrize.register_parametrization(module, attr, parametrization)
    zero_grads = getattr(pruner, "_zero_grads", None)
    if zero_grads is not None:
        zero_grads.clear()


def check_records(records: Any) -> None:
    """Raise a clear error unless ``records`` is a list of ``{layer name: [channel index, ...]}``."""
    if not isinstance(records, list) or not all(
        isinstance(record, dict)
        and all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(i, int) and i >= 0 for i in v)
            for k, v in record.items()
        )
        for record in records
    ):
        raise ValueError("recorded shrinks must be a list of {layer name: [channel index, ...]}")


def _records_of(state: Any) -> list[dict[str, list[int]]]:
    meta = distributed.carried_meta(state)  # an optimizer state_dict, also one through DCP's helpers
    if meta is not None:
        state = meta.get("pruner") or {}
    if isinstance(state, dict):
        state = state.get("shrinks")
    if not isinstance(state, list) or not state:
        raise ValueError("the state records no shrink (pass the optimizer's or pruner's state_dict saved after one)")
    check_records(state)
    return state
