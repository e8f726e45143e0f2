"""Coupled structured groups: every parameter slice that must go with one channel, from Torch-Pruning.

A *channel group* (:class:`ChannelGroup`) is one Torch-Pruning dependency group: the output channels
of a root layer together with everything tied to them (the producing layers' rows and biases,
BatchNorm / InstanceNorm affine entries, every consuming layer's input slice, all producers joined
by a residual add, the slices of a concatenation, depthwise convolutions). Its *units* are the
root's channels: unit ``u`` of a group is every slice Torch-Pruning would remove with root channel
``u``. The graph comes from ``torch_pruning.DependencyGraph``; nothing here walks the model itself.

Each member tensor is pruned along one or two dims (a middle convolution: its output dim belongs to
its own group, its input dim to the producer's). The fused step sees a tensor's groups as
``j(i) = (i // inner) % G``: with grouped dims ``lo <= hi``, ``inner = prod(shape[hi+1:])`` and
``G = prod(shape[lo:hi+1])``, so a *slot* ``j`` is a position in dims ``lo..hi`` and its
coefficient is the sum over those dims of the owning units' values (a flag: their maximum). A
convolution grouped on both dims therefore carries an ``[2, out * in]`` table (1/(kh*kw) of its
weight; as large as the weight for a linear layer).

Scores (the rule every method uses): a unit's Lp score is the Lp norm of all its member slices
(weights, biases, normalization entries) taken together; its mean |w| is their L1 norm over their
element count. Layers that produce the model's outputs and embedding tables are not pruned
structurally unless named in ``include``; layers matched by ``exclude`` are Torch-Pruning's
``ignored_layers``: a group that would shrink one of them is left out whole.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .methods.base import check_ratio
from .optional import require


@dataclass
class Member:
    """One parameter slice of a channel group: positions along ``dim`` of ``name``, and their units."""

    name: str  # parameter name in the model, e.g. "layer1.0.bn1.weight"
    param: Tensor
    dim: int
    positions: Tensor  # int64 [k] positions along dim
    units: Tensor  # int64 [k] the group's unit (root channel) each position goes with
    scored: bool = True


@dataclass
class ChannelGroup:
    """One coupled group: ``size`` units (the root layer's output channels) and all their members."""

    name: str  # the root module's name
    root: nn.Module
    size: int
    ratio: float
    offset: int  # first global unit id
    members: list[Member] = field(default_factory=list)
    inputs: bool = False  # units are the root's input channels (uncoupled "channels" groups)
    removed: int = 0  # units already removed from the model by sparsetrain.shrink (size counts the rest)

    def modules(self) -> list[str]:
        return sorted({m.name.rsplit(".", 1)[0] for m in self.members})


@dataclass
class TensorLayout:
    """How one member tensor sees the groups: ``j(i) = (i // inner) % groups`` and the slot owners."""

    name: str
    param: Tensor
    module_name: str
    attr: str
    groups: int
    inner: int
    slot_owner: list[Tensor]  # per grouped dim: int64 [groups], global unit id or the padding id


class StructureError(ValueError):
    """A structure that cannot be pruned as asked (raised before anything is modified)."""


def conv1d_type() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` (GPT-2's linear layer, weight ``[in, out]``) once transformers is loaded.

    A model holding Conv1D layers has imported it; sparsetrain never imports transformers itself.
    """
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def _conv1d_pruner():
    """Torch-Pruning pruning functions for GPT-2's ``Conv1D`` (output features are dim 1 of the weight)."""
    tp = require("torch_pruning", "structured pruning")

    class Conv1DPruner(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer, idxs):
            keep = sorted(set(range(layer.weight.shape[1])) - set(idxs))
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
            layer.nf = len(keep)
            return layer

        def prune_in_channels(self, layer, idxs):
            keep = sorted(set(range(layer.weight.shape[0])) - set(idxs))
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
            if hasattr(layer, "nx"):
                layer.nx = len(keep)
            return layer

        def get_out_channels(self, layer):
            return layer.weight.shape[1]

        def get_in_channels(self, layer):
            return layer.weight.shape[0]

    return Conv1DPruner()


def flat_tensors(value: Any) -> list[Tensor]:
    """Every tensor inside ``value`` (tensors, tuples, lists, dicts, ``ModelOutput``), in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flat_tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flat_tensors(v)]
    if hasattr(value, "to_tuple"):
        return flat_tensors(value.to_tuple())
    return []


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """``model(x)``, ``model(*args)`` or ``model(**kwargs)`` for a tensor, a tuple/list or a dict."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` and ``torch.compile``'s wrapper.

    Names are those of the user's module either way: ``fc``, not ``module.fc`` or ``_orig_mod.fc``.
    """
    while True:
        inner = getattr(model, "module", None)
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) and isinstance(inner, nn.Module):
            model = inner
            continue
        compiled = getattr(model, "_orig_mod", None)  # torch._dynamo's OptimizedModule
        if type(model).__name__ == "OptimizedModule" and isinstance(compiled, nn.Module):
            model = compiled
            continue
        return model


def build_graph(model: nn.Module, example_inputs: Any):
    """Torch-Pruning's dependency graph of ``model`` (traced with autograd, also under ``torch.no_grad()``)."""
    tp = require("torch_pruning", "structured pruning")

    if example_inputs is None:
        raise StructureError(
            "structured pruning works on coupled channel groups traced from the model: pass example_inputs= "
            "(a tensor, a tuple of arguments or a dict of keyword arguments); coupled=False prunes each "
            "layer's own filters instead"
        )
    inputs = example_inputs if isinstance(example_inputs, (dict, tuple, list)) else (example_inputs,)
    customized = {}
    conv1d = conv1d_type()
    if conv1d is not None:
        customized[conv1d] = _conv1d_pruner()
    training = model.training
    try:
        with torch.enable_grad(), _no_kv_cache(model):
            graph = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=inputs,
                output_transform=lambda out: [t for t in flat_tensors(out) if t.grad_fn is not None],
                customized_pruners=customized,
                verbose=False,
            )
    except Exception as exc:
        _check_forward(model, example_inputs)
        raise StructureError(
            f"Torch-Pruning could not trace the model ({type(exc).__name__}: {exc}); check example_inputs, "
            "exclude= the layers it cannot follow, or prune unstructured (structure=None) or per layer (coupled=False)"
        ) from exc
    finally:
        model.train(training)
        _reshard(model)
    return graph


# A Torch-Pruning group visits a node once per distinct index set reaching it; a legitimate group
# reaches one node with a handful of them (a split and re-concatenation of the same channels). The
# rotary embeddings of Llama-style attention (slice halves, negate one, concatenate) make its index
# mapping diverge instead: every turn around the cycle shifts the indices and the walk never ends.
# Swin's window reshapes make it grow: every turn multiplies the index set (a layer of 32 features
# reached with 8192 channels), and the walk spends minutes building lists before the visits stop it.
MAX_VISITS = 16


def _index_limit(module: Any) -> int | None:
    """The most channels a walk can legitimately map onto ``module``: its parameters' largest dimension."""
    tensors = [module] if isinstance(module, Tensor) else []
    if isinstance(module, nn.Module):
        tensors = list(module.parameters(recurse=False))
    sizes = [max(t.shape) for t in tensors if t.dim()]
    return max(sizes) if sizes else None


@contextlib.contextmanager
def _bounded_walk() -> Iterator[None]:
    """Make Torch-Pruning's group walk raise StructureError when it revisits a node too often."""
    tp = require("torch_pruning", "structured pruning")
    group_type = tp.dependency.Group
    original = group_type.add_dep

    def add_dep(group, dep, idxs):
        limit = _index_limit(dep.target.module)
        if limit is not None and len(idxs) > limit:
            raise StructureError(
                f"Torch-Pruning's channel mapping does not converge through {dep.target.name} (it maps "
                f"{len(idxs)} channels onto a layer no dimension of which has more than {limit})"
            )
        visits = group.__dict__.setdefault("_sparsetrain_visits", Counter())
        key = (id(dep.target), getattr(dep.handler, "__name__", id(dep.handler)))
        visits[key] += 1
        if visits[key] > MAX_VISITS:
            raise StructureError(
                f"Torch-Pruning's channel mapping does not converge through {dep.target.name} (it reaches it "
                f"with more than {MAX_VISITS} different channel sets, as through rotary position embeddings)"
            )
        return original(group, dep, idxs)

    group_type.add_dep = add_dep
    try:
        yield
    finally:
        group_type.add_dep = original


def pruning_group(graph, module: nn.Module, function, idxs: list[int]):
    """``graph.get_pruning_group(module, function, idxs)``, raising StructureError where its walk diverges.

    Torch-Pruning loops forever on some graphs (Llama's rotary embeddings); the walk is stopped once
    it reaches one node with more than ``MAX_VISITS`` different channel sets; an index it cannot map (its
    walk through an ``nn.GRU`` / ``nn.LSTM``) raises StructureError too.
    """
    with _bounded_walk():
        try:
            return graph.get_pruning_group(module, function, idxs=idxs)
        except IndexError as exc:
            raise StructureError(
                f"Torch-Pruning cannot map {type(module).__name__}'s channels through the model ({exc})"
            ) from exc


def _check_forward(model: nn.Module, example_inputs: Any) -> None:
    """After a failed trace: raise the model's own error when it cannot run on ``example_inputs`` at all.

    Torch-Pruning retries a failed ``model(*inputs)`` as ``model(inputs)`` and reports the retry's
    error, which hides the real one (a wrong input shape reads as "must be Tensor, not tuple").
    """
    model.eval()  # as Torch-Pruning traces: no BatchNorm statistics are updated
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    except Exception as exc:
        raise StructureError(
            f"the model cannot run on example_inputs ({type(exc).__name__}: {exc}); pass what the model is called "
            "with: a tensor (model(x)), a tuple of arguments (model(*args)) or a dict of keyword arguments"
        ) from exc


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module) -> Iterator[None]:
    """Trace transformers models without their key/value cache (``config.use_cache = False`` meanwhile).

    The cache is inference state, not part of the trained computation, and its concatenation with
    the (empty) past keys is a node Torch-Pruning cannot size.
    """
    changed = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None) is True:
            changed[id(config)] = config
    for config in changed.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in changed.values():
            config.use_cache = True


def _reshard(model: nn.Module) -> None:
    """FSDP2: put the sharded parameters back after the tracing forward (the root keeps them gathered)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover (torch without distributed)
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _module_of_param(model: nn.Module) -> dict[int, tuple[str, str, str]]:
    """id(param) -> (parameter name, module name, attribute)."""
    out = {}
    for name, p in model.named_parameters():
        clean = name.replace(".parametrizations.", ".").replace(".original", "")
        module_name, _, attr = clean.rpartition(".")
        out[id(p)] = (clean, module_name, attr)
    return out


def _raw_param(module: nn.Module, attr: str) -> Tensor:
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and attr in parametrizations:
        return parametrizations[attr].original
    return getattr(module, attr)


def is_mask(parametrization: nn.Module) -> bool:
    """Whether ``parametrization`` is a :class:`~sparsetrain.autograd.MaskedPruner`'s mask."""
    return type(parametrization).__name__ == "_MaskParametrization"


def own_parametrizations(module: nn.Module) -> list[str]:
    """The attributes of ``module`` carrying a parametrization of the model's own (``weight_norm``,
    ``spectral_norm``, ...: anything but a MaskedPruner's mask)."""
    parametrizations = module._modules.get("parametrizations")
    if parametrizations is None:
        return []
    return [attr for attr, plist in parametrizations.items() if not all(map(is_mask, plist))]


def _unmaskable(module: nn.Module, attr: str) -> str | None:
    """Why ``module.attr`` cannot be masked as one tensor (a parametrization of several, as weight_norm's), or None."""
    parametrizations = module._modules.get("parametrizations")
    if parametrizations is None or attr not in parametrizations or hasattr(parametrizations[attr], "original"):
        return None
    kinds = ", ".join(type(p).__name__ for p in parametrizations[attr])
    return f"its {attr} is parametrized ({kinds}) from several tensors, which cannot be masked"


def _slices(module: Any, fn_name: str, pruning_dim: int) -> list[tuple[str, int]] | str:
    """The (attribute, dim) slices Torch-Pruning's ``fn_name`` removes from ``module``, or why it cannot be masked."""
    conv1d = conv1d_type()
    out = fn_name == "prune_out_channels"
    if isinstance(module, nn.Parameter):
        return [("", pruning_dim)]
    if isinstance(module, nn.modules.conv._ConvNd):
        bias = [("bias", 0)] if module.bias is not None else []
        if module.groups > 1 and module.groups == module.in_channels == module.out_channels:
            return [("weight", 0)] + bias  # depthwise: channel c is filter c
        if module.groups > 1:
            return f"grouped convolution (groups={module.groups}) is not supported as a coupled member"
        if out:
            return [("weight", 1 if module.transposed else 0)] + bias
        return [("weight", 0 if module.transposed else 1)]
    if isinstance(module, nn.Linear):
        bias = [("bias", 0)] if module.bias is not None else []
        return [("weight", 0)] + bias if out else [("weight", 1)]
    if conv1d is not None and isinstance(module, conv1d):
        return [("weight", 1), ("bias", 0)] if out else [("weight", 0)]
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return [("weight", 0), ("bias", 0)] if module.affine else []
    if isinstance(module, nn.PReLU):
        return [("weight", 0)] if module.num_parameters > 1 else []
    if isinstance(module, nn.Embedding):
        return [("weight", 1)]
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return (
            f"{type(module).__name__} normalizes over these channels together: the smaller model would compute "
            "different statistics than the masked one"
        )
    if isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False)):
        return f"{type(module).__name__} is not a layer sparsetrain can mask as Torch-Pruning prunes it"
    return []


_ATTENTION_OPS = ("attention", "bmm", "matmul", "baddbmm")


def _group_problem(graph, group, ignored: set[int], named: set[int]) -> str | None:
    """Why this Torch-Pruning group cannot be pruned by default (None when it can)."""
    tp = require("torch_pruning", "structured pruning")

    for dep, _ in group:
        target = dep.target
        module = target.module
        fn_out = graph.is_out_channel_pruning_fn(dep.handler)
        if fn_out and id(module) in ignored and id(module) not in named:
            return f"it would shrink {target.name}, which is excluded (Torch-Pruning ignored_layers)"
        if fn_out and isinstance(module, nn.Embedding) and id(module) not in named:
            return f"it would shrink the embedding table {target.name} (name it in include= to prune it)"
        if fn_out and (not target.outputs or any(isinstance(o.module, tp.ops._OutputOp) for o in target.outputs)):
            if not any(id(dep2.target.module) in named for dep2, _ in group):
                return f"it changes the model's outputs (through {target.name}; name the layer in include= to prune it)"
        if isinstance(module, tp.ops._ElementWiseOp) and any(k in target.name.lower() for k in _ATTENTION_OPS):
            return (
                f"its channels pass through attention ({target.name}), which Torch-Pruning does not split by head here"
            )
    return None


def _out_dim(module: nn.Module) -> int:
    """The dimension of ``module.weight`` holding its outputs (transformers' Conv1D, ConvTranspose: 1)."""
    return 1 if isinstance(module, conv1d_type() or ()) or getattr(module, "transposed", False) else 0


class CoupledGroups:
    """The channel groups of a model and the per-tensor slot layouts the fused step uses."""

    def __init__(self, groups: list[ChannelGroup], skipped: dict[str, str]) -> None:
        self.groups = groups
        self.skipped = skipped
        self.total_units = sum(g.size for g in groups)
        self.tensors = self._layouts()

    # ------------------------------------------------------------------ building
    @classmethod
    def trace(
        cls,
        model: nn.Module,
        example_inputs: Any,
        *,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        types: tuple[type, ...] = (),
        ratios: dict[str, float] | None = None,
        default_ratio: float,
    ) -> CoupledGroups:
        """Channel groups rooted at the layers of ``types`` (or named by ``include``), from Torch-Pruning."""
        model = unwrap(model)
        graph = build_graph(model, example_inputs)
        modules = dict(model.named_modules())
        names = {id(m): n for n, m in modules.items()}
        include, exclude = list(include or ()), list(exclude or ())
        matches = lambda name, patterns: any(fnmatch.fnmatchcase(name, p) for p in patterns)  # noqa: E731
        ignored = {id(m) for n, m in modules.items() if n and matches(n, exclude)}
        named = {id(m) for n, m in modules.items() if n and include and matches(n, include)}
        params = _module_of_param(model)
        covered: set[int] = set()
        groups: list[ChannelGroup] = []
        skipped: dict[str, str] = {}
        offset = 0
        for name, module in modules.items():
            if not name or id(module) in covered or id(module) in ignored:
                continue
            if module not in graph.module2node:
                if id(module) in named and isinstance(getattr(module, "weight", None), nn.Parameter):
                    skipped[name] = (
                        "the traced forward never calls it (its weight is used directly, as nn.MultiheadAttention "
                        "uses out_proj's), so Torch-Pruning cannot follow its channels"
                    )
                continue
            chosen = id(module) in named if include else isinstance(module, tuple(types))
            if not chosen:
                continue
            pruner = graph.get_pruner_of_module(module)
            channels = pruner.get_out_channels(module) if pruner is not None else None
            if channels is None:
                if id(module) in named:
                    raise StructureError(f"layer {name!r} ({type(module).__name__}) has no output channels to prune")
                continue
            try:
                tp_group = pruning_group(graph, module, pruner.prune_out_channels, list(range(channels)))
            except StructureError as exc:
                if id(module) in named:
                    raise StructureError(f"layer {name!r} cannot be pruned structurally: {exc}") from exc
                skipped[name] = str(exc)
                continue
            for dep, _ in tp_group:
                if graph.is_out_channel_pruning_fn(dep.handler):
                    covered.add(id(dep.target.module))
            problem = _group_problem(graph, tp_group, ignored, named)
            members: list[Member] | str = problem if problem else _members(tp_group, params, names)
            if isinstance(members, str):
                if id(module) in named:
                    raise StructureError(
                        f"layer {name!r} cannot be pruned structurally: {members}; exclude it (exclude=[{name!r}])"
                    )
                skipped[name] = members
                continue
            ratio = default_ratio
            for pattern, value in (ratios or {}).items():
                if fnmatch.fnmatchcase(name, pattern):
                    ratio = check_ratio(f"ratios[{pattern!r}]", value)
            groups.append(ChannelGroup(name, module, channels, ratio, 0, members))
        for name, problem in removal_problems(model, example_inputs, groups).items():
            if id(modules[name]) in named:
                raise StructureError(f"layer {name!r} cannot be pruned structurally: {problem}")
            skipped[name] = problem
        groups = [g for g in groups if g.name not in skipped]
        for g in groups:
            g.offset, offset = offset, offset + g.size
        if not groups:
            reasons = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:4])
            raise StructureError(
                "no layer can be pruned structurally (check include / exclude / types)"
                + (f" ({reasons})" if reasons else "")
            )
        return cls(groups, skipped)

    @classmethod
    def per_layer(
        cls, targets: list[Any], structure: str, modules: dict[str, nn.Module] | None = None
    ) -> CoupledGroups:
        """Uncoupled groups: each target layer's own filters (with their bias) or input channels.

        ``modules`` (the model's ``named_modules()``): a tied weight's filters are also those of every
        other layer holding it (``target.aliases``) with the same output dimension, so their biases
        are members too.
        """
        groups, offset = [], 0
        for t in targets:
            w = t.param
            out_dim = _out_dim(t.module)
            if structure == "filters" and out_dim == 1 and getattr(t.module, "groups", 1) > 1:
                raise StructureError(
                    f"{t.module_name}: a grouped transposed convolution (groups={t.module.groups}) keeps output "
                    f"channel g * {w.shape[1]} + j at weight[g-th block of input channels, j], not along one dim of "
                    f"its weight {tuple(w.shape)}: prune it unstructured (structure=None) or exclude it "
                    f"(exclude=[{t.module_name!r}])"
                )
            dim = out_dim if structure == "filters" else 1 - out_dim
            size = w.shape[dim]
            units = torch.arange(size, device=w.device)
            members = [Member(t.name, w, dim, units, units)]
            holders = [(t.module_name, t.module)]
            for alias in t.aliases:
                name, _, attr = alias.rpartition(".")
                module = (modules or {}).get(name)
                if attr == t.name.rpartition(".")[2] and module is not None and _out_dim(module) == out_dim:
                    holders.append((name, module))
            for name, module in holders:
                bias = getattr(module, "bias", None)
                if structure == "filters" and isinstance(bias, nn.Parameter) and bias.shape == (size,):
                    members.append(Member(f"{name}.bias", bias, 0, units, units, scored=False))
            groups.append(ChannelGroup(t.module_name, t.module, size, t.ratio, offset, members, dim != out_dim))
            offset += size
        return cls(groups, {})

    def _layouts(self) -> list[TensorLayout]:
        by_param: dict[int, dict[str, Any]] = {}
        for g in self.groups:
            for m in g.members:
                entry = by_param.setdefault(id(m.param), {"member": m, "owners": {}})
                owner = entry["owners"].setdefault(m.dim, torch.full((m.param.shape[m.dim],), -1, dtype=torch.int64))
                positions, units = m.positions.cpu(), m.units.cpu() + g.offset
                clash = (owner[positions] >= 0) & (owner[positions] != units)
                if bool(clash.any()):
                    raise StructureError(f"{m.name}: a slice belongs to two channel groups")
                owner[positions] = units
        layouts = []
        for entry in by_param.values():
            m, owners = entry["member"], entry["owners"]
            shape = tuple(m.param.shape)
            lo, hi = min(owners), max(owners)
            groups_count = math.prod(shape[lo : hi + 1])
            inner = math.prod(shape[hi + 1 :])
            slot = torch.arange(groups_count)
            slot_owner = []
            for d, owner in sorted(owners.items()):
                stride = math.prod(shape[d + 1 : hi + 1])
                ids = owner[(slot // stride) % shape[d]]
                slot_owner.append(torch.where(ids < 0, self.total_units, ids).to(m.param.device))
            module_name, _, attr = m.name.rpartition(".")
            layouts.append(TensorLayout(m.name, m.param, module_name, attr, groups_count, inner, slot_owner))
        return layouts

    # ------------------------------------------------------------------ per-unit values <-> tensors
    def _padded(self, per_group: list[Tensor], device: torch.device, fill: float = 0.0) -> Tensor:
        values = torch.cat([v.to(device=device, dtype=torch.float32).reshape(-1) for v in per_group])
        return torch.cat([values, torch.full((1,), fill, device=device)])

    def slot_values(self, layout: TensorLayout, per_group: list[Tensor], reduce: str) -> Tensor:
        """Per-slot values of one tensor from per-unit values (``sum`` over its grouped dims, or ``max``)."""
        padded = self._padded(per_group, layout.param.device)
        parts = [padded[owner] for owner in layout.slot_owner]
        out = parts[0]
        for part in parts[1:]:
            out = out + part if reduce == "sum" else torch.maximum(out, part)
        return out

    def write_rows(self, optimizer: Any, row: int, per_group: list[Tensor], reduce: str = "sum") -> None:
        """Write per-unit values into row ``row`` of every member tensor's group table."""
        for layout in self.tensors:
            optimizer.state[layout.param]["group_coefs"][row].copy_(self.slot_values(layout, per_group, reduce))

    def expand(self, layout: TensorLayout, slot_values: Tensor) -> Tensor:
        """A per-slot vector broadcast to the tensor's shape."""
        param = layout.param
        index = (torch.arange(param.numel(), device=param.device) // layout.inner) % layout.groups
        return slot_values[index].reshape(param.shape)

    def set_alive(self, optimizer: Any, alive: list[Tensor]) -> None:
        """Prune, now, every member slice of the units where ``alive`` is False (weights and states)."""
        dead = [(~a.bool()).float() for a in alive]
        for layout in self.tensors:
            flags = self.slot_values(layout, dead, "max")
            optimizer.set_mask(layout.param, self.expand(layout, flags == 0))

    def alive_units(self, mask_of) -> list[Tensor]:
        """Per group, bool per unit: some member slice of it is still unmasked (``mask_of(param)`` -> bool)."""
        alive = torch.zeros(self.total_units + 1, dtype=torch.bool)
        for g in self.groups:
            for m in g.members:
                mask = mask_of(m.param).cpu()
                live = mask.movedim(m.dim, 0).reshape(mask.shape[m.dim], -1).any(dim=1)
                alive[m.units.cpu() + g.offset] |= live[m.positions.cpu()]
        return [alive[g.offset : g.offset + g.size] for g in self.groups]

    def scores(self, norm: float = 1.0, *, mean: bool = False, sync: Any = None, weight_of: Any = None) -> list[Tensor]:
        """Per group, per unit: the Lp norm of all its scored member slices (``mean``: mean |w| instead).

        ``weight_of(param)``: the tensor read for a member parameter (default the parameter itself;
        :meth:`sparsetrain.Pruner.group_scores` passes one that zeroes pruned elements first).

        DTensor shards (FSDP2, ``Shard(0)``): each rank sums ``|w|**p`` over its own rows, and the
        partial sums of every group (maxima for ``p = inf``) are reduced in ONE collective through
        ``sync`` (the optimizer's :class:`~sparsetrain.distributed.ShardSync`, pending statistics
        riding along); element counts come from the full shapes.
        """
        from . import distributed

        device = distributed.local(self.groups[0].members[0].param).device
        total = torch.zeros(self.total_units + 1, dtype=torch.float64, device=device)
        count = torch.zeros_like(total)
        p = 1.0 if mean else float(norm)
        sharded = False
        for g in self.groups:
            for m in g.members:
                if not m.scored:
                    continue
                full_shape = m.param.shape
                w = distributed.local(m.param if weight_of is None else weight_of(m.param)).detach().double().abs()
                positions, units = m.positions.to(device), (m.units + g.offset).to(device)
                if distributed.is_sharded(m.param):
                    sharded = True
                    if m.dim == 0:  # this rank holds rows [first, first + rows) only
                        first = distributed.shard_offset(m.param) // max(1, math.prod(full_shape[1:]))
                        keep = (positions >= first) & (positions < first + w.shape[0])
                        positions, units = positions[keep] - first, units[keep]
                w = w.movedim(m.dim, 0)
                w = w.reshape(w.shape[0], math.prod(w.shape[1:]))
                if math.isinf(p):  # max norm: the largest |w| over all member slices
                    if w.numel():
                        total.scatter_reduce_(0, units, w.amax(dim=1)[positions], "amax")
                    continue
                per_position = (w.pow(p) if p != 1.0 else w).sum(dim=1)
                total.index_add_(0, units, per_position[positions])
                per_slice = math.prod(full_shape) // max(full_shape[m.dim], 1)
                every = (m.units + g.offset).to(device)
                count.index_add_(0, every, torch.full(every.shape, float(per_slice), dtype=count.dtype, device=device))
        if sharded and sync is None:
            sync = distributed.ShardSync(distributed.group_of([m.param for g in self.groups for m in g.members]))
        if sharded:
            if math.isinf(p):
                sync.reduce([], maxes=[total])
            else:
                sync.reduce([total])
        values = total / count.clamp(min=1) if mean else (total if math.isinf(p) else total.pow(1.0 / p))
        return [values[g.offset : g.offset + g.size].float() for g in self.groups]

    def describe(self) -> str:
        lines = [f"{len(self.groups)} channel groups, {self.total_units} units"]
        for g in self.groups:
            lines.append(f"  {g.name}: {g.size} channels, ratio {g.ratio}, members {', '.join(g.modules())}")
        for name, reason in self.skipped.items():
            lines.append(f"  skipped {name}: {reason}")
        return "\n".join(lines)


@dataclass
class Removal:
    """What removing some units of the model's channel groups takes from one parameter."""

    param: Tensor
    holder: nn.Module
    attr: str
    removed: dict[int, list[int]]  # dim -> positions removed (the parameter's numbering before)
    tied: tuple[tuple[nn.Module, str], ...] = ()  # the other (module, attribute) holding it, cut alike

    def kept(self) -> dict[int, Tensor]:
        """Per sliced dim, the positions that stay (int64, increasing)."""
        out = {}
        for dim, removed in self.removed.items():
            gone = set(removed)
            out[dim] = torch.tensor([i for i in range(self.param.shape[dim]) if i not in gone], dtype=torch.int64)
        return out


def param_holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) -> every (module, attribute) holding it, in ``modules()`` order (a tied weight: several)."""
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, value in module._parameters.items():
            if value is not None:
                holders.setdefault(id(value), []).append((module, attr))
    return holders


def cut_alike(per_holder: dict[tuple[int, str], set], holders: list[tuple[nn.Module, str]]) -> bool:
    """Whether a removal cuts a tied parameter in every one of its ``holders`` and the same way in each:
    ``per_holder`` maps (id(module), attribute) to the set of what it cuts there."""
    every = {(id(module), attr) for module, attr in holders}
    return set(per_holder) == every and len({frozenset(c) for c in per_holder.values()}) == 1


def removals(model: nn.Module, graph, plan: dict[str, list[int]]) -> list[Removal] | str:
    """The parameter slices Torch-Pruning removes for ``plan`` (root layer name -> units), or why it cannot.

    Nothing is modified. Every slice is one of a layer's weights and biases (:func:`_slices`); a
    parameter held by several modules (tied weights) must be cut alike in every one of them (it then
    stays one tensor), a parameter outside any module is refused, and so is a
    layer whose shape would change while it carries a parametrization of the model's own
    (``weight_norm``, ...; a MaskedPruner's masks must be removed first), which Torch-Pruning's
    slicing would not carry over. Such layers elsewhere in the model are left alone.
    """
    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    holders = param_holders(model)
    found: dict[int, Removal] = {}
    cuts: dict[int, dict[tuple[int, str], set[tuple[int, int]]]] = {}  # tied: per holder, its (dim, position)s
    for name, units in plan.items():
        if not units:
            continue
        root = modules[name]
        function = graph.get_pruner_of_module(root).prune_out_channels
        for item in pruning_group(graph, root, function, list(units)):
            dep, idxs = item.dep, item.idxs
            module = dep.target.module
            slices = _slices(module, getattr(dep.handler, "__name__", ""), dep.target.pruning_dim)
            if isinstance(slices, str):
                return f"{dep.target.name}: {slices}"
            parametrized = own_parametrizations(module) if slices and idxs else []
            if parametrized:
                return (
                    f"layer {names.get(id(module), dep.target.name)!r} ({type(module).__name__}) would change shape "
                    f"but its {', '.join(parametrized)} has parametrizations shrink() cannot carry over"
                )
            for attr, dim in slices:
                if attr == "":
                    return f"{dep.target.name}: a parameter outside any layer"
                param = _raw_param(module, attr)
                if param is None:
                    continue
                places = holders.get(id(param), [])
                if not places:
                    return f"{dep.target.name}.{attr} is held by no module"
                entry = found.setdefault(id(param), Removal(param, places[0][0], places[0][1], {}, tuple(places[1:])))
                positions = entry.removed.setdefault(dim % param.dim(), [])
                positions.extend(sorted(set(idxs) - set(positions)))
                if len(places) > 1:
                    cut = cuts.setdefault(id(param), {}).setdefault((id(module), attr), set())
                    cut.update((dim % param.dim(), i) for i in idxs)
    for key, per_holder in cuts.items():
        places = holders[key]
        if not cut_alike(per_holder, places):
            first, attr = places[0]
            return (
                f"{names.get(id(first), type(first).__name__)}.{attr} is held by {len(places)} modules (tied weights) "
                "and the removal would not cut it alike in all of them"
            )
    return list(found.values())


def _on_meta(value: Any) -> Any:
    """``value`` with every tensor inside it (tensors, tuples, lists, dicts) replaced by a meta tensor."""
    if isinstance(value, Tensor):
        return torch.empty_like(value, device="meta")
    if isinstance(value, dict):
        return {k: _on_meta(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_meta(v) for v in value)
    return value


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are meta tensors (no memory for their values)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _runs_after_removal(model: nn.Module, example_inputs: Any, roots: list[str]) -> str | None:
    """On a meta copy of ``model``: None if it still runs with unit 0 of each of ``roots`` removed, else why not."""
    copied, inputs = _meta_copy(model), _on_meta(example_inputs)
    try:
        graph = build_graph(copied, inputs)
    except Exception:  # noqa: BLE001 (the model does not trace on meta tensors: nothing to judge)
        return None
    try:
        remove_units(copied, graph, {name: [0] for name in roots})
        with torch.no_grad():
            call_model(copied, inputs)
    except Exception as exc:  # noqa: BLE001 (any failure of the smaller model is the finding)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def removal_problems(model: nn.Module, example_inputs: Any, groups: list[ChannelGroup]) -> dict[str, str]:
    """Per group (root name): why the model no longer runs once the group's channels are removed.

    Torch-Pruning can return a group that misses a consumer of its channels (a ``chunk`` after
    ShuffleNetV2's channel shuffle): masking it trains, but no smaller model computes the same, so
    export and shrink fail after the training. Checked when the groups are traced, on a meta copy of
    the model (shapes only, no memory for the weights): unit 0 of every group removed at once, then,
    only if that fails, each group alone to name it. A model that does not run on meta tensors
    (data-dependent control flow) is not checked here; export still compares the outputs.
    """
    from .distributed import is_sharded

    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.device.type == "meta" or is_sharded(t) for t in tensors):
        return {}  # meta already, or FSDP2 shards (every rank traces the same groups): nothing to check here
    candidates = [g.name for g in groups if g.size >= 2 and not g.inputs]
    if not candidates:
        return {}
    training = model.training
    model.eval()
    try:
        if _runs_after_removal(model, example_inputs, candidates) is None:
            return {}
        problems = {}
        for name in candidates:
            problem = _runs_after_removal(model, example_inputs, [name])
            if problem is not None:
                problems[name] = (
                    "Torch-Pruning's group misses a layer its channels reach: the model does not run once they "
                    f"are removed ({problem})"
                )
        return problems
    finally:
        model.train(training)


def remove_units(model: nn.Module, graph, plan: dict[str, list[int]]) -> None:
    """Remove ``plan``'s units (root layer name -> its output channels) and every slice coupled to them.

    One ``DependencyGraph.get_pruning_group(root, prune_out_channels, idxs).prune()`` per root, on
    the graph traced from ``model``; the roots' channels belong to no other group, so later groups'
    indices stay valid.
    """
    modules = dict(model.named_modules())
    for name, units in plan.items():
        if units:
            root = modules[name]
            function = graph.get_pruner_of_module(root).prune_out_channels
            pruning_group(graph, root, function, list(units)).prune()


def _members(tp_group, params: dict[int, tuple[str, str, str]], names: dict[int, str]) -> list[Member] | str:
    """The parameter slices of a Torch-Pruning group, or the reason one cannot be masked."""
    members: dict[tuple[int, int], Member] = {}
    for item in tp_group:
        dep, idxs = item.dep, item.idxs
        module = dep.target.module
        fn_name = getattr(dep.handler, "__name__", "")
        slices = _slices(module, fn_name, dep.target.pruning_dim)
        if isinstance(slices, str):
            return f"{names.get(id(module), dep.target.name)}: {slices}"
        root_idxs = item.root_idxs
        if any(r is None for r in root_idxs):
            return f"{dep.target.name}: Torch-Pruning gives no root channel for some of its indices"
        for attr, dim in slices:
            problem = _unmaskable(module, attr) if attr else None
            if problem is not None:
                return f"{names.get(id(module), dep.target.name)}: {problem}"
            param = module if attr == "" else _raw_param(module, attr)
            if param is None:
                continue
            info = params.get(id(param))
            if info is None:
                return f"{dep.target.name}: a parameter of it is not a parameter of the model"
            dim = dim % param.dim()
            if idxs and (max(idxs) >= param.shape[dim] or len(idxs) != len(set(idxs))):
                shape = tuple(param.shape)
                return f"{info[0]}: Torch-Pruning maps the group to indices outside dim {dim} of shape {shape}"
            positions = torch.tensor(list(idxs), dtype=torch.int64)
            units = torch.tensor(list(root_idxs), dtype=torch.int64)
            key = (id(param), dim)
            if key in members:
                old = members[key]
                seen = set(old.positions.tolist())
                fresh = [i for i, p in enumerate(positions.tolist()) if p not in seen]
                old.positions = torch.cat([old.positions, positions[fresh]])
                old.units = torch.cat([old.units, units[fresh]])
            else:
                members[key] = Member(info[0], param, dim, positions, units)
    return list(members.values())
