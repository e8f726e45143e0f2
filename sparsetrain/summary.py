"""A per-layer table of a pruned model: shape, sparsity, dead outputs and inputs, parameters, MACs.

Used by :meth:`sparsetrain.Pruner.summary`. Everything here reads the current weights (one host
transfer per call); nothing is modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .coupled import call_model, flat_tensors, unwrap
from .metrics import output_major

if TYPE_CHECKING:
    from .pruner import Pruner


@dataclass
class LayerRow:
    """One pruned weight's line of the table.

    Attributes:
        name: the parameter's name in the model (``"features.0.weight"``).
        shape: the weight's shape.
        sparsity: fraction of the weight's elements that are zero (or masked); for a 1-D member of
            a channel group (a bias, a normalization layer's scale or shift, which can be 0 and
            alive), the fraction of its entries that are masked.
        dead_outputs: outputs (rows of a linear weight, filters of a conv; the masked entries of a
            1-D member) whose incoming weights are all zero; ``outputs`` is their total.
        dead_inputs: inputs (columns, input channels) whose weights are all zero; ``inputs`` is
            their total (``0`` for a 1-D weight).
        params: elements of the weight (and of the bias pruned with it).
        alive_params: nonzero elements among ``params``.
        macs: multiply-accumulates per sample of the dense layer on the example inputs
            (``None`` without example inputs).
        alive_macs: the same counting only nonzero weights (what sparse execution would do).
        aliases: the weight's other names (tied weights: counted once, under ``name``).
    """

    name: str
    shape: tuple[int, ...]
    sparsity: float
    dead_outputs: int
    outputs: int
    dead_inputs: int
    inputs: int
    params: int
    alive_params: int
    macs: int | None = None
    alive_macs: int | None = None
    aliases: tuple[str, ...] = ()


def _layers_of(pruner: Pruner, target) -> list:
    """The modules computing with ``target``'s tensor: its module, and those sharing it (tied weights)."""
    modules = dict(unwrap(pruner.model).named_modules())
    attr = target.name.rpartition(".")[2]
    layers = [target.module]
    for alias in target.aliases:
        module_name, _, alias_attr = alias.rpartition(".")
        module = modules.get(module_name)
        if alias_attr == attr and module is not None and all(module is not m for m in layers):
            layers.append(module)
    return layers


def _positions(pruner: Pruner, example_inputs) -> dict[str, int]:
    """Per target: output positions per sample (conv: output pixels; linear: tokens), by forward hooks."""
    seen: dict[tuple[str, int], int] = {}
    hooks = []
    tensors = [t for t in flat_tensors(example_inputs) if t.dim() > 0]
    if not tensors:
        raise ValueError(
            "summary(example_inputs): no batched tensor in example_inputs (a tensor, a tuple of arguments or a "
            f"dict of keyword arguments), got {type(example_inputs).__name__}"
        )
    batch = tensors[0].shape[0]
    for t in pruner.targets:
        out_features = getattr(t.module, "nf", t.param.shape[0])  # transformers' Conv1D: [in, out]

        def hook(module, args, output, name=t.name, out_features=out_features):
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                seen[name, id(module)] = 0  # a lookup multiplies nothing
            elif getattr(module, "transposed", False) and args and isinstance(args[0], Tensor):
                # a transposed convolution multiplies each input position by all its weights
                seen[name, id(module)] = args[0].numel() // max(1, batch * module.in_channels)
            elif isinstance(output, Tensor):
                seen[name, id(module)] = output.numel() // max(1, batch * out_features)

        hooks.extend(layer.register_forward_hook(hook) for layer in _layers_of(pruner, t))
    was_training = pruner.model.training
    pruner.model.eval()
    try:
        with torch.no_grad():
            call_model(pruner.model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
        pruner.model.train(was_training)
    positions: dict[str, int] = {}
    for (name, _), count in seen.items():  # a tied weight: the positions of every layer using it
        positions[name] = positions.get(name, 0) + count
    return positions


def layer_rows(pruner: Pruner, example_inputs: Tensor | tuple | None = None) -> list[LayerRow]:
    """The table's rows, one per pruned weight, in the pruner's order (a tied weight once).

    Args:
        pruner: a :class:`~sparsetrain.Pruner` (or ``MaskedPruner``).
        example_inputs: a batch the model accepts (a tensor, a tuple of positional inputs or a dict of
            keyword arguments, as ``transformers`` models take); with
            it, MACs per sample are counted from the output shapes seen by forward hooks (the model
            runs once in eval mode under ``no_grad``).

    With FSDP2 shards the counts are those of the full tensors (one collective, and the model's
    forward with ``example_inputs``): every rank must call it.
    """
    from .distributed import is_sharded, zero_counts

    positions = _positions(pruner, example_inputs) if example_inputs is not None else {}
    zeros = [pruner.dead_elements(t) for t in pruner.targets]  # 1-D members (BatchNorm entries): masked ones
    counts = zero_counts(zeros, [t.param for t in pruner.targets])  # FSDP2 shards: one collective
    rows = []
    for t, c, z in zip(pruner.targets, counts, zeros):
        shape = tuple(t.param.shape)
        outputs, dead_outputs, inputs, dead_inputs = c["rows"], c["dead_rows"], c["cols"], c["dead_cols"]
        seen = output_major(t.module, z) if not is_sharded(t.param) else z
        if seen is not z:  # Conv1D [in, out], ConvTranspose [in, out / groups, ...]: counted as the module sees it
            dead = seen.reshape(seen.shape[0], -1)
            outputs, dead_outputs = dead.shape[0], int(dead.all(dim=1).sum())
            inputs, dead_inputs = seen.shape[1], int(seen.transpose(0, 1).reshape(seen.shape[1], -1).all(dim=1).sum())
        if len(shape) < 2:
            inputs = dead_inputs = 0
        nonzero = c["numel"] - c["zeros"]
        params, alive = c["numel"], nonzero
        if t.bias is not None:
            params += t.bias.numel()
            alive += int(pruner.optimizer.mask(t.bias).sum())  # a bias entry can be 0 and alive
        sparsity = 1.0 - nonzero / max(1, c["numel"])
        row = LayerRow(t.name, shape, sparsity, dead_outputs, outputs, dead_inputs, inputs, params, alive)
        row.aliases = t.aliases
        if t.name in positions:
            row.macs = positions[t.name] * c["numel"]
            row.alive_macs = positions[t.name] * nonzero
        rows.append(row)
    return rows


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_rows(rows: list[LayerRow]) -> str:
    """The rows as an aligned text table with a total line."""
    header = ["layer", "shape", "sparsity", "dead out", "dead in", "params alive/total", "MACs alive/dense"]
    lines = []
    for r in rows:
        lines.append(
            [
                f"{r.name} (= {', '.join(r.aliases)})" if r.aliases else r.name,
                "x".join(str(s) for s in r.shape),
                f"{r.sparsity:.1%}",
                f"{r.dead_outputs}/{r.outputs}",
                f"{r.dead_inputs}/{r.inputs}" if r.inputs else "-",
                f"{_count(r.alive_params)}/{_count(r.params)}",
                f"{_count(r.alive_macs)}/{_count(r.macs)}" if r.macs is not None else "-",
            ]
        )
    params = sum(r.params for r in rows)
    alive = sum(r.alive_params for r in rows)
    weights = sum(_numel(r.shape) for r in rows)
    zeros = sum(round(r.sparsity * _numel(r.shape)) for r in rows)
    has_macs = rows and all(r.macs is not None for r in rows)
    lines.append(
        [
            "total",
            "",
            f"{zeros / max(1, weights):.1%}",
            f"{sum(r.dead_outputs for r in rows)}/{sum(r.outputs for r in rows)}",
            f"{sum(r.dead_inputs for r in rows)}/{sum(r.inputs for r in rows)}",
            f"{_count(alive)}/{_count(params)}",
            f"{_count(sum(r.alive_macs for r in rows))}/{_count(sum(r.macs for r in rows))}" if has_macs else "-",
        ]
    )
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    right = [False, False, True, True, True, True, True]

    def fmt(cells):
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(c) for c in lines[:-1]), rule, fmt(lines[-1])])


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def summary(pruner: Pruner, example_inputs: Tensor | tuple | None = None) -> str:
    """The per-layer table of ``pruner``'s weights as text (see :func:`layer_rows`)."""
    return format_rows(layer_rows(pruner, example_inputs))
