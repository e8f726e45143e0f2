"""Export: fold masks into the weights; for structured pruning, a physically smaller model.

The copy's dead channels are removed with Torch-Pruning: for each channel group, the pruned
channels of its root layer are handed to ``DependencyGraph.get_pruning_group(...).prune()``, which
removes every coupled slice (the same groups the masks covered, so nothing alive is cut). The
smaller model is then run on the example inputs and compared with the masked model, whatever its
outputs are (tensors, tuples, dicts, ``ModelOutput``): if they differ by more than 1e-5 relative
(an uncoupled ``coupled=False`` pruning whose removed filters still fed an activation with
f(0) != 0, say), export raises instead of returning a different function.

A weight shared by several layers (tied weights) stays one Parameter: a group is removed only when
it cuts the same slices from every layer holding the tensor (two layers whose outputs are added,
say), and the layers are then tied again; otherwise (an encoder / decoder pair, where one's rows
are the other's columns) the dead units stay. Unstructured pruning removes a dead output only when
every output coupled to it (added to it, or the same rows of a tied weight) is dead too.

Works under ``torch.no_grad()``, on a ``DistributedDataParallel``-wrapped model (its inner module
is copied; no collective is called, so one rank alone can export), and returns plain parameters:
the result saves and reloads with ``torch.save`` / ``torch.load`` and, for transformers models,
``save_pretrained``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .coupled import (
    StructureError,
    _slices,
    build_graph,
    call_model,
    cut_alike,
    flat_tensors,
    is_mask,
    param_holders,
    pruning_group,
    unwrap,
)
from .optional import require

if TYPE_CHECKING:
    from .pruner import Pruner

RTOL = 1e-5


def fold_masks(pruner: Pruner, model: nn.Module) -> None:
    """Multiply each pruned tensor of ``model`` (a copy with plain parameters) by its mask."""
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied weight under every name
    with torch.no_grad():
        for t in pruner.targets:
            name = t.name if t.name in params else _inner_name(t.name)
            tensor = params[name]
            tensor.mul_(pruner.optimizer.mask(t.param).to(tensor.device))


def _inner_name(name: str) -> str:
    return name[len("module.") :] if name.startswith("module.") else name


def _strip_parametrizations(model: nn.Module) -> None:
    """Turn the copy's mask parametrizations (a MaskedPruner's) back into plain parameters.

    The model's own parametrizations (``weight_norm``, ``spectral_norm``, ...) stay as they are. torch's
    ``remove_parametrizations`` edits the module's dynamically made class, which a deep copy shares with
    the original, so the copy is unwrapped by hand (on a class of its own) and the original keeps working.
    """
    for module in list(model.modules()):
        parametrizations = module._modules.get("parametrizations")
        if parametrizations is None:
            continue
        ours = [name for name, plist in parametrizations.items() if any(map(is_mask, plist))]
        if not ours:
            continue
        stacked = [name for name in ours if not all(map(is_mask, parametrizations[name]))]
        if stacked:
            raise RuntimeError(
                f"export: {type(module).__name__}.{stacked[0]} carries the pruner's mask together with other "
                "parametrizations; remove those (torch.nn.utils.parametrize.remove_parametrizations) before pruning"
            )
        originals = {name: parametrizations[name].original for name in ours}
        cls = module.__class__
        if len(ours) == len(parametrizations):
            module.__class__ = cls.__bases__[0]
            del module._modules["parametrizations"]
        else:  # the model's own parametrizations stay: a class of the copy's own without the stripped properties
            module.__class__ = type(cls.__name__, cls.__bases__, {k: v for k, v in vars(cls).items() if k not in ours})
            for name in ours:
                del parametrizations[name]
        for name, original in originals.items():
            module.register_parameter(name, original)


def dead_output_groups(module: nn.Module) -> torch.Tensor:
    """Bool per output: its incoming weights and bias are all exactly zero (it outputs f(0))."""
    weight = module.weight.detach()
    if getattr(module, "transposed", False):  # ConvTranspose: [in, out / groups, ...]
        if module.groups != 1:
            return torch.zeros(module.out_channels, dtype=torch.bool, device=weight.device)
        weight = weight.transpose(0, 1)
    dead = (weight.reshape(weight.shape[0], -1) == 0).all(dim=1)
    if getattr(module, "bias", None) is not None:
        dead &= module.bias.detach() == 0
    return dead


def unused_output(graph, module: nn.Module, fn, index: int) -> bool:
    """True when every layer consuming output ``index`` has all-zero weights for it (it is never used)."""
    consumers = 0
    for dep, idxs in pruning_group(graph, module, fn, [index]):
        target = dep.target.module
        if getattr(dep.handler, "__name__", "") != "prune_in_channels" or target is module:
            continue
        if not isinstance(target, (nn.Linear, nn.modules.conv._ConvNd)):
            return False
        consumers += 1
        if (target.weight.detach()[:, list(idxs)] != 0).any():
            return False
    return consumers > 0


def tied_holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) -> every (module, attribute) holding it, for parameters held more than once (tied weights)."""
    return {key: value for key, value in param_holders(model).items() if len(value) > 1}


def _tied_in_group(group, tied: dict[int, list[tuple[nn.Module, str]]]) -> list[int] | None:
    """The tied parameters a Torch-Pruning group slices, or None when pruning it would untie or tear one.

    Torch-Pruning slices each module's parameter on its own, so a tensor held by several modules is
    only removed from when every holder is in the group with exactly the same slices (the holders are
    then tied again to one of the identical results by :func:`_retie`); anything else is refused.
    """
    cuts: dict[int, dict[tuple[int, str], set[tuple[int, tuple[int, ...]]]]] = {}
    for item in group:
        dep, idxs = item.dep, item.idxs
        module = dep.target.module
        if id(module) in tied:  # a bare tied parameter outside any layer
            return None
        owned = [id(p) for p in module._parameters.values() if p is not None and id(p) in tied]
        slices = _slices(module, getattr(dep.handler, "__name__", ""), dep.target.pruning_dim)
        if isinstance(slices, str):
            if owned:
                return None
            continue
        for attr, dim in slices:
            param = module._parameters.get(attr)
            if param is None or id(param) not in tied:
                continue
            cut = cuts.setdefault(id(param), {}).setdefault((id(module), attr), set())
            cut.add((dim % param.dim(), tuple(sorted(idxs))))
    if not all(cut_alike(per_holder, tied[key]) for key, per_holder in cuts.items()):
        return None
    return list(cuts)


def _retie(tied: dict[int, list[tuple[nn.Module, str]]], keys: list[int]) -> None:
    """After a group's removal: every holder of each tied parameter gets the first holder's (equal) new one."""
    for key in keys:
        (first, first_attr), *others = tied[key]
        param = first._parameters[first_attr]
        for module, attr in others:
            if not torch.equal(module._parameters[attr], param):  # the group cut every holder alike
                raise RuntimeError(f"export: the holders of tied {first_attr} were cut differently")
            module._parameters[attr] = param
        tied[id(param)] = tied.pop(key)


def _target_modules(t, modules: dict[str, nn.Module]) -> list[nn.Module]:
    """The modules of the copy computing with target ``t``'s tensor: its own and those of its aliases."""
    out: list[nn.Module] = []
    for name in (t.module_name, *(alias.rpartition(".")[0] for alias in t.aliases)):
        module = modules.get(_inner_name(name))
        if module is not None and all(module is not m for m in out):
            out.append(module)
    return out


def _prune(graph, group, tied: dict[int, list[tuple[nn.Module, str]]], check: bool = True) -> None:
    """Prune a Torch-Pruning group unless it would untie a shared weight (its dead units then stay).

    ``check``: also leave it when Torch-Pruning's ``check_pruning_group`` refuses it (all of a layer's channels).
    """
    keys = _tied_in_group(group, tied)
    if keys is not None and (not check or graph.check_pruning_group(group)):
        group.prune()
        _retie(tied, keys)


def _remove_dead_outputs(pruner: Pruner, graph, modules: dict[str, nn.Module], tied) -> None:
    """Unstructured pruning: remove outputs with all-zero incoming weights, or that no consumer reads."""
    tp = require("torch_pruning", "structured export")

    for module in [m for t in pruner.targets for m in _target_modules(t, modules)]:
        if isinstance(module, nn.Linear):
            fn = tp.prune_linear_out_channels
        elif isinstance(module, nn.modules.conv._ConvNd):
            fn = tp.prune_conv_out_channels
        else:
            continue
        dead_in = dead_output_groups(module).tolist()
        try:
            unused = {i for i, d in enumerate(dead_in) if not d and unused_output(graph, module, fn, i)}
            dead = [i for i, d in enumerate(dead_in) if d or i in unused]
            if len(dead) == len(dead_in):
                continue
            while dead:  # units whose removal would also cut a live output elsewhere stay
                group = pruning_group(graph, module, fn, dead)
                live = _live_partners(group, unused)
                if not live:
                    _prune(graph, group, tied)
                    break
                dead = [i for i in dead if i not in live]
        except StructureError:  # Torch-Pruning cannot follow this layer's outputs: it keeps them
            continue


def _live_partners(group, unused: set[int]) -> set[int]:
    """The root units of ``group`` whose removal would cut a live output of another layer.

    A layer's output coupled to a dead one (added to it, or the same rows of a tied weight) must be
    dead too, unless the root unit's value is read by no one (``unused``: its consumers' weights are zero).
    """
    live: set[int] = set()
    for item in group:
        module = item.dep.target.module
        if getattr(item.dep.handler, "__name__", "") != "prune_out_channels":
            continue
        if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        dead = dead_output_groups(module)
        for idx, root in zip(item.idxs, item.root_idxs):
            if root is not None and root not in unused and not bool(dead[idx]):
                live.add(int(root))
    return live


def relative_error(result: Any, reference: Any) -> float:
    """Largest ``|a - b| / max(|b|)`` over the tensors of two outputs of the same structure."""
    got, want = flat_tensors(result), flat_tensors(reference)
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        return float("inf")
    worst = 0.0
    for a, b in zip(got, want):
        if not b.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(a, b) else float("inf"))
            continue
        scale = float(b.abs().max()) if b.numel() else 0.0
        diff = float((a.double() - b.double()).abs().max()) if b.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def export(pruner: Pruner, example_inputs: Any = None, *, structured: bool | None = None) -> nn.Module:
    """A copy of the pruned model: masks folded in and, if ``structured``, pruned channels removed.

    ``structured`` defaults to True for structured methods and needs ``example_inputs`` (a tensor,
    a tuple of arguments or a dict of keyword arguments).

    Not for FSDP2 (DTensor) parameters, which no rank holds whole: gather the full model and
    optimizer state dicts on every rank (``torch.distributed.checkpoint.state_dict.get_state_dict``
    with ``StateDictOptions(full_state_dict=True, cpu_offload=True)``), then on one process load
    them into a plain model, its optimizer and a Pruner with the same method, and export there
    (README, many ranks).
    """
    from .distributed import is_sharded

    sharded = [t.name for t in pruner.targets if is_sharded(t.param)]
    if sharded:
        raise RuntimeError(
            f"export() needs whole tensors, but {sharded[0]} is an FSDP2 shard (DTensor): on every rank gather "
            "model_sd, optim_sd = torch.distributed.checkpoint.state_dict.get_state_dict(model, opt, options="
            "StateDictOptions(full_state_dict=True, cpu_offload=True)); then on rank 0 load model_sd into a plain "
            "model, build its optimizer and a Pruner with the same method, opt.load_state_dict(optim_sd) and "
            "export from that Pruner"
        )
    model = copy.deepcopy(unwrap(pruner.model))
    _strip_parametrizations(model)
    fold_masks(pruner, model)
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    if structured is None:
        structured = pruner.method.structure is not None
    if not structured:
        return model
    if example_inputs is None:
        raise ValueError("structured export needs example_inputs to trace the model's dependency graph")
    training = model.training
    model.eval()
    with torch.no_grad():
        reference = call_model(model, example_inputs)
    graph = build_graph(model, example_inputs)
    modules = dict(model.named_modules())
    tied = tied_holders(model)  # a tied weight is cut only where it stays one tensor
    if pruner.groups is None:  # unstructured pruning: remove the nodes it happened to kill
        _remove_dead_outputs(pruner, graph, modules, tied)
    for group, alive in zip(pruner.groups.groups if pruner.groups else [], pruner.alive_units()):
        dead = [int(i) for i in torch.nonzero(~alive).flatten()]
        if dead:
            root = modules[_inner_name(group.name)]
            pruner_of = graph.get_pruner_of_module(root)
            function = pruner_of.prune_in_channels if group.inputs else pruner_of.prune_out_channels
            _prune(graph, pruning_group(graph, root, function, dead), tied, check=False)
    try:
        with torch.no_grad():
            result = call_model(model, example_inputs)
    except RuntimeError as exc:  # a removal Torch-Pruning could not follow (a grouped convolution it re-grouped)
        raise RuntimeError(
            f"structured export made a model that cannot run on example_inputs ({str(exc).splitlines()[0]}); "
            "export with structured=False"
        ) from exc
    error = relative_error(result, reference)
    if not error <= RTOL:
        shapes = [tuple(t.shape) for t in flat_tensors(result)], [tuple(t.shape) for t in flat_tensors(reference)]
        what = (
            f"output shapes {shapes[0]} instead of {shapes[1]}"
            if shapes[0] != shapes[1]
            else f"relative error {error:.3g}"
        )
        raise RuntimeError(f"structured export would change the model's outputs ({what}); export with structured=False")
    model.train(training)
    return model


def size_report(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    """Parameter count, nonzero parameter count and multiply-accumulate count (Torch-Pruning)."""
    tp = require("torch_pruning", "size_report")

    from .coupled import conv1d_type

    model = unwrap(model)
    inputs = example_inputs if isinstance(example_inputs, (dict, tuple, list)) else (example_inputs,)
    training = model.training
    conv1d_macs = []  # GPT-2's Conv1D is an addmm Torch-Pruning's counter does not see: counted here
    conv1d = conv1d_type()
    hooks = [
        m.register_forward_hook(lambda mod, args, out: conv1d_macs.append(out.numel() * mod.weight.shape[0]))
        for m in model.modules()
        if conv1d is not None and isinstance(m, conv1d)
    ]
    try:
        with torch.no_grad():
            macs, params = tp.utils.count_ops_and_params(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    macs += sum(conv1d_macs)
    model.train(training)
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return {"params": int(params), "nonzero_params": nonzero, "macs": int(macs)}
