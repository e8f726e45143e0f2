"""Export: fold masks into the weights; for structured pruning, a physically smaller model.

Removal uses Torch-Pruning's dependency graph (every coupled layer — following convolutions,
norms, linear layers — shrinks with it). Only outputs whose incoming weights and bias are exactly zero,
or whose every consumer has all-zero weights for them, are removed, and the result is checked
against the masked model on the example inputs: if removing
them would change the outputs (an activation with f(0) != 0, say), export raises instead of
returning a different function.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .optional import require

if TYPE_CHECKING:
    from .pruner import Pruner


def fold_masks(pruner: Pruner, model: nn.Module) -> None:
    """Multiply each pruned weight (and structured bias) of ``model`` (a copy) by its mask."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for t in pruner.targets:
            module = modules[t.module_name]
            weight = _raw_weight(module)
            weight.mul_(pruner.optimizer.mask(t.param).to(weight.device))
            if t.bias is not None:
                module.bias.mul_(pruner.optimizer.mask(t.bias).to(module.bias.device))


def _raw_weight(module: nn.Module) -> torch.Tensor:
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations:
        return parametrizations.weight.original
    return module.weight


def dead_output_groups(module: nn.Module) -> torch.Tensor:
    """Bool per output: its incoming weights and bias are all exactly zero (it outputs f(0))."""
    weight = module.weight.detach()
    dead = (weight.reshape(weight.shape[0], -1) == 0).all(dim=1)
    if getattr(module, "bias", None) is not None:
        dead &= module.bias.detach() == 0
    return dead


def unused_output(graph, module: nn.Module, fn, index: int) -> bool:
    """True when every layer consuming output ``index`` has all-zero weights for it (it is never used)."""
    consumers = 0
    for dep, idxs in graph.get_pruning_group(module, fn, idxs=[index]):
        target = dep.target.module
        if getattr(dep.handler, "__name__", "") != "prune_in_channels" or target is module:
            continue
        if not isinstance(target, (nn.Linear, nn.modules.conv._ConvNd)):
            return False
        consumers += 1
        if (target.weight.detach()[:, list(idxs)] != 0).any():
            return False
    return consumers > 0


def _strip_parametrizations(model: nn.Module) -> None:
    """Turn the copy's masked-weight parametrizations back into plain ``weight`` parameters.

    torch's ``remove_parametrizations`` edits the module's dynamically made class, which a deep copy
    shares with the original, so the copy is unwrapped by hand and the original keeps working.
    """
    for module in list(model.modules()):
        parametrizations = module._modules.get("parametrizations")
        if parametrizations is None or "weight" not in parametrizations:
            continue
        original = parametrizations["weight"].original
        module.__class__ = module.__class__.__bases__[0]
        del module._modules["parametrizations"]
        module.register_parameter("weight", original)


def export(pruner: Pruner, example_inputs: torch.Tensor | None = None, *, structured: bool | None = None) -> nn.Module:
    """A copy of the pruned model: masks folded in and, if ``structured``, dead outputs removed.

    ``structured`` defaults to True for structured methods and needs ``example_inputs``.
    """
    model = copy.deepcopy(pruner.model)
    _strip_parametrizations(model)
    fold_masks(pruner, model)
    if structured is None:
        structured = pruner.method.structure is not None
    if not structured:
        return model
    if example_inputs is None:
        raise ValueError("structured export needs example_inputs to trace the model's dependency graph")
    tp = require("torch_pruning", "structured export")

    model.eval()
    with torch.no_grad():
        reference = model(example_inputs)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    modules = dict(model.named_modules())
    for t in pruner.targets:
        module = modules[t.module_name]
        if isinstance(module, nn.Linear):
            fn = tp.prune_linear_out_channels
        elif isinstance(module, nn.modules.conv._ConvNd):
            fn = tp.prune_conv_out_channels
        else:
            continue
        dead_in = dead_output_groups(module).tolist()
        dead = [i for i, d in enumerate(dead_in) if d or unused_output(graph, module, fn, i)]
        if not dead or len(dead) == module.weight.shape[0]:
            continue
        group = graph.get_pruning_group(module, fn, idxs=dead)
        if graph.check_pruning_group(group):
            group.prune()
    with torch.no_grad():
        result = model(example_inputs)
    if result.shape != reference.shape or not torch.allclose(result, reference, rtol=1e-4, atol=1e-5):
        diff = (result - reference).abs().max().item() if result.shape == reference.shape else float("nan")
        raise RuntimeError(
            f"structured export would change the model's outputs (max abs diff {diff:.3g}); "
            "export with structured=False"
        )
    return model


def size_report(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, Any]:
    """Parameter count, nonzero parameter count and multiply-accumulate count (Torch-Pruning)."""
    tp = require("torch_pruning", "size_report")

    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return {"params": int(params), "nonzero_params": nonzero, "macs": int(macs)}
