"""Pruner: attaches a method to a model and a sparsetrain optimizer, two lines on top of a loop.

    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    method = sparsetrain.methods.GReg1(target=0.5, structure="filters")
    pruner = sparsetrain.Pruner(model, opt, method, example_inputs=x)
    ... loss.backward(); opt.step(); opt.zero_grad()   # unchanged

The pruner hooks the optimizer's step (``register_step_pre_hook`` / ``register_step_post_hook``):
before a step the method writes its coefficients and schedules a pruning decision, the fused op
does the rest, after the step the history is recorded (device tensors, no host sync per step).
"""

from __future__ import annotations

import copy
import fnmatch
import gc
import math
import re
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from . import distributed
from .coupled import CoupledGroups, is_mask, unwrap
from .methods.base import Method, check_ratio
from .metrics import History, output_major
from .optim import dead
from .optim.base import FusedOptimizer
from .selection import group_layout
from .validation import integer

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# The Pruner each method object drives: a method keeps its schedule's state (GReg's phase and penalties,
# event counts), so one object driving two pruners would advance once per pruner and step.
_DRIVEN_BY: weakref.WeakKeyDictionary[Method, weakref.ref] = weakref.WeakKeyDictionary()
# The Pruner that prunes each weight: a second one (a MaskedPruner beside a fused Pruner, two optimizers
# holding one weight) would mask it with a second schedule and a second set of masks.
_PRUNED_BY: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _attached(ref: weakref.ref | None) -> Pruner | None:
    """The Pruner behind ``ref`` while it is attached to its optimizer (not removed), else None."""
    pruner = ref() if ref is not None else None
    return pruner if pruner is not None and pruner.optimizer.pruner is pruner else None


def default_types() -> tuple[type[nn.Module], ...]:
    """:data:`DEFAULT_TYPES`, plus ``transformers``' ``Conv1D`` (GPT-2) when transformers is loaded."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return DEFAULT_TYPES + (conv1d,) if conv1d is not None else DEFAULT_TYPES


@dataclass
class Target:
    """One prunable weight: where it lives, its target ratio and its group layout."""

    name: str  # "features.0.weight"
    module_name: str
    module: nn.Module
    param: Tensor
    ratio: float
    structure: str | None
    groups: int
    inner: int
    bias: Tensor | None = None  # unused: structured biases are targets of their own
    aliases: tuple[str, ...] = ()  # the tensor's other names (tied weights: "lm_head.weight" beside "wte.weight")


def parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> its names, in ``named_parameters()`` order (a tied weight has several).

    A parametrized tensor goes by its module's attribute (``conv.weight``, not
    ``conv.parametrizations.weight.original``).
    """
    out: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        clean = re.sub(r"\.parametrizations\.([^.]+)\.original\d*$", r".\1", name)
        names = out.setdefault(id(param), [])
        if clean not in names:
            names.append(clean)
    return out


def select_targets(
    model: nn.Module,
    *,
    include=None,
    exclude=None,
    types=DEFAULT_TYPES,
    ratios=None,
    default_ratio: float,
    structure: str | None,
) -> list[Target]:
    """Weights of modules of ``types`` (or named by ``include`` patterns), minus ``exclude`` patterns.

    A weight shared by several selected modules (tied weights) is one target, named by its first
    name in ``named_parameters()`` order, its other names in ``aliases``; the modules sharing it
    must not ask for different ratios.
    """
    modules = dict(model.named_modules())
    for label, patterns in (("include", include), ("exclude", exclude), ("ratios", ratios)):
        for pattern in patterns or ():
            if not any(fnmatch.fnmatchcase(name, pattern) for name in modules if name):
                raise ValueError(f"{label}: no module of the model matches {pattern!r} (modules: {_some(modules)})")
    if types is DEFAULT_TYPES:
        types = default_types()
    names = parameter_names(model)
    targets: list[Target] = []
    seen: dict[int, Target] = {}
    unstructured_only: list[str] = []  # chosen modules whose weight matrices only unstructured pruning takes
    for name, module in modules.items():
        if not name:
            continue
        chosen = any(fnmatch.fnmatchcase(name, p) for p in include) if include else isinstance(module, tuple(types))
        if not chosen or any(fnmatch.fnmatchcase(name, p) for p in exclude or ()):
            continue
        weights = module_weights(module)
        if structure is not None and weights and weights[0][0] != "weight":
            unstructured_only.append(f"{name} ({type(module).__name__}: {', '.join(a for a, _ in weights)})")
            continue
        ratio = default_ratio
        for pattern, value in (ratios or {}).items():
            if fnmatch.fnmatchcase(name, pattern):
                ratio = check_ratio(f"ratios[{pattern!r}]", value)
        for attr, weight in weights:
            tied = seen.get(id(weight))
            if tied is not None:  # one tensor, one target: its mask is decided once
                if ratio != tied.ratio:
                    raise ValueError(
                        f"{name}.{attr} is the same tensor as {tied.name} (tied weights) but its ratio would be "
                        f"{ratio}, {tied.name}'s {tied.ratio}: give the modules sharing it one ratio"
                    )
                continue
            try:
                groups, inner = group_layout(weight.shape, structure)
            except ValueError as exc:
                raise ValueError(
                    f"module {name!r} ({type(module).__name__}, {attr} {tuple(weight.shape)}): {exc}"
                ) from None
            first, *aliases = names.get(id(weight)) or [f"{name}.{attr}"]
            target = Target(first, name, module, weight, ratio, structure, groups, inner, aliases=tuple(aliases))
            seen[id(weight)] = target
            targets.append(target)
    if not targets:
        detail = (
            f"; structured pruning takes a module's `weight`, and {unstructured_only[0]} keeps its weight "
            "matrices under other names: prune them unstructured (structure=None)"
            if unstructured_only
            else ""
        )
        raise ValueError(f"no prunable weight was selected (check include / exclude / types){detail}")
    return targets


def module_weights(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weight matrices a selected module contributes, as ``(attribute, parameter)``: its ``weight``, or,
    for the modules that keep theirs under other names, those: ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``'s
    ``weight_ih_l{k}``, ``weight_hh_l{k}`` (and ``weight_hr_l{k}`` with ``proj_size``, ``*_reverse`` when
    bidirectional) and ``nn.MultiheadAttention``'s ``in_proj_weight`` (or ``q/k/v_proj_weight``; its
    ``out_proj`` is an ``nn.Linear`` of its own). Biases never; a parametrized weight (not a Parameter) none."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter):
        return [("weight", weight)]
    if isinstance(module, nn.RNNBase):
        attrs = [a for a in module._flat_weights_names if a.startswith("weight_")]
    elif isinstance(module, nn.MultiheadAttention):
        attrs = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"]
    else:
        return []
    found = [(a, module._parameters.get(a)) for a in attrs]
    return [(a, p) for a, p in found if isinstance(p, nn.Parameter)]


def check_unmasked(model: nn.Module) -> None:
    """Refuse a model whose weights a :class:`~sparsetrain.autograd.MaskedPruner` already masks."""
    if not isinstance(model, nn.Module):
        return  # selection_args names the wrong kind
    for name, module in unwrap(model).named_modules():
        parametrizations = module._modules.get("parametrizations")
        if parametrizations is not None and any(
            map(is_mask, (p for plist in parametrizations.values() for p in plist))
        ):
            raise ValueError(
                f"the model's weights are already masked by a MaskedPruner ({name}.{next(iter(parametrizations))}"
                ", ...): one pruner per model"
            )


def _some(modules: dict[str, nn.Module]) -> str:
    names = [n for n in modules if n]
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")


def selection_args(model: Any, method: Any, include: Any, exclude: Any, types: Any, ratios: Any) -> tuple:
    """Check the arguments that choose what is pruned; ``(include, exclude, types, ratios)`` normalized.

    A single pattern string stands for a list of one (``include="fc"``), as does a single module class
    for ``types``. Raises ``TypeError`` naming the argument, before anything is selected or modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(method, type) and issubclass(method, Method):
        raise TypeError(f"method must be a method instance, got the class {method.__name__}: call it, "
                        f"e.g. methods.{method.__name__}(target=0.5)")  # fmt: skip
    if not isinstance(method, Method):
        raise TypeError(f"method must be one of sparsetrain.methods (e.g. methods.Magnitude(0.5)), got "
                        f"{type(method).__name__} {method!r}")  # fmt: skip

    def patterns(label: str, value: Any) -> list[str] | None:
        if value is None or isinstance(value, str):
            return None if value is None else [value]
        items = list(value) if isinstance(value, (list, tuple, set, frozenset)) else None
        if items is None or not all(isinstance(v, str) for v in items):
            bad = value if items is None else next(v for v in items if not isinstance(v, str))
            raise TypeError(f"{label} must be a module-name pattern (str) or a list of them, got "
                            f"{type(bad).__name__} {bad!r}")  # fmt: skip
        return items

    include, exclude = patterns("include", include), patterns("exclude", exclude)
    if isinstance(types, type):
        types = (types,)
    if not isinstance(types, (tuple, list)) or not all(isinstance(t, type) for t in types):
        raise TypeError(f"types must be a tuple of module classes (e.g. (nn.Linear,)), got {types!r}")
    if types is not DEFAULT_TYPES:
        types = tuple(types)
    if ratios is not None and (not isinstance(ratios, dict) or not all(isinstance(k, str) for k in ratios)):
        raise TypeError(f"ratios must be a dict {{module-name pattern: ratio}}, got {type(ratios).__name__} {ratios!r}")
    return include, exclude, types, ratios


def resolve_targets(
    model: nn.Module,
    method: Method,
    *,
    include=None,
    exclude=None,
    types=DEFAULT_TYPES,
    ratios=None,
    example_inputs: Any = None,
    coupled: bool = True,
) -> tuple[list[Target], CoupledGroups | None]:
    """The tensors ``method`` prunes and, for a structured method, their channel groups.

    Structured methods prune coupled channel groups traced from ``example_inputs`` with
    Torch-Pruning (:mod:`sparsetrain.coupled`); ``coupled=False`` prunes each layer's own filters
    (or input channels) instead, without tracing. Every member tensor (weights, biases,
    normalization affine entries, consumers' input slices) becomes a target.
    """
    include, exclude, types, ratios = selection_args(model, method, include, exclude, types, ratios)
    model = unwrap(model)  # names and modules of the model inside a DDP wrapper (no "module." prefix)
    structure = method.structure
    if structure is None:
        targets = select_targets(
            model,
            include=include,
            exclude=exclude,
            types=types,
            ratios=ratios,
            default_ratio=method.target,
            structure=None,
        )
        return targets, None
    if coupled:
        if types is DEFAULT_TYPES:  # transposed convolutions' filters too (a U-Net's upsampling)
            types = default_types() + (nn.modules.conv._ConvTransposeNd,)
        if include or exclude or ratios:
            select_targets(
                model, include=include, exclude=exclude, types=types, ratios=ratios, default_ratio=0.0, structure=None
            )  # the same pattern checks and errors as unstructured pruning
        if structure != "filters":
            raise ValueError(
                f"coupled structured pruning removes output channels (structure='filters' or 'neurons'), got "
                f"{structure!r}; use coupled=False to prune each layer's input channels"
            )
        groups = CoupledGroups.trace(
            model,
            example_inputs,
            include=include,
            exclude=exclude,
            types=types,
            ratios=ratios,
            default_ratio=method.target,
        )
    else:
        layers = select_targets(
            model,
            include=include,
            exclude=exclude,
            types=types,
            ratios=ratios,
            default_ratio=method.target,
            structure=structure,
        )
        groups = CoupledGroups.per_layer(layers, structure, dict(model.named_modules()))
    modules = dict(unwrap(model).named_modules())
    names = parameter_names(unwrap(model))
    targets = []
    for t in groups.tensors:
        aliases = tuple(n for n in names.get(id(t.param), ()) if n != t.name)
        module = modules[t.module_name]
        targets.append(Target(t.name, t.module_name, module, t.param, method.target, structure, t.groups, t.inner,
                              aliases=aliases))  # fmt: skip
    return targets, groups


class Pruner:
    """Prune ``model``'s weights with ``method`` through the fused steps of ``optimizer``.

    Creating the pruner selects the weights to prune, gives each a mask (all alive) and pruning
    state in the optimizer, lets the method set its coefficients (``method.attach``) and hooks the
    optimizer's ``step()`` (``register_step_pre_hook`` / ``register_step_post_hook``): before every
    step the method schedules its coefficients and pruning decisions, the fused op applies them,
    after the step the per-layer history is recorded on the device (no host sync per step). The
    training loop itself does not change.

    Args:
        model: the model whose weights are pruned (its parameters must be in ``optimizer``).
        optimizer: a sparsetrain optimizer (:class:`~sparsetrain.optim.SGD`, :class:`~sparsetrain.optim.Adam`,
            :class:`~sparsetrain.optim.AdamW`). To keep another optimizer use
            :class:`~sparsetrain.autograd.MaskedPruner`.
        method: the pruning method (:mod:`sparsetrain.methods`).
        include: module-name patterns (``fnmatch``, e.g. ``"features.*"``) of the modules whose
            ``weight`` is pruned; default ``None``: every module of ``types``. A selected ``nn.LSTM`` /
            ``nn.GRU`` / ``nn.RNN`` gives its ``weight_ih_l{k}`` / ``weight_hh_l{k}`` (``weight_hr_l{k}``,
            ``*_reverse``) matrices, an ``nn.MultiheadAttention`` its ``in_proj_weight``
            (:func:`module_weights`; unstructured methods only).
        exclude: module-name patterns left out (default ``None``: none), e.g. ``["lm_head"]`` for an
            output layer tied to an embedding.
        types: module classes pruned by default (default ``nn.Linear`` and ``nn.Conv1d/2d/3d``, plus
            transformers' ``Conv1D`` when transformers is loaded; never biases, normalization layers
            or embeddings unless included by name).
        ratios: per-module-pattern target ratios overriding the method's ``target``
            (``{"classifier.*": 0.5}``); the last matching pattern wins.
        record_every: steps between two history records (default ``10``). The history is bounded
            (:data:`sparsetrain.metrics.HISTORY_LIMIT` records: when full, every other record is
            dropped and the interval doubles), so neither it nor the state_dict grows with the run.
        example_inputs: for structured methods (``structure="filters"``): inputs to trace the model
            with Torch-Pruning (a tensor, a tuple of arguments or a dict of keyword arguments).
            Pruning then works on coupled channel groups (:mod:`sparsetrain.coupled`): a channel
            goes with its BatchNorm entries, every consumer's input slice and every layer tied to it
            by a residual add or a concatenation. Layers that produce the model's outputs and
            embedding tables are left out unless named in ``include``.
        coupled: ``False`` prunes each structured layer's own filters (or input channels) without
            tracing, as ``torch.nn.utils.prune.ln_structured`` selects (default ``True``).
        shrink_after_prune: after every structured pruning event (the end of GReg's prune phase,
            a structured Magnitude event) remove the pruned channels from the live model with
            :meth:`shrink` (default ``False``). Not with ``DistributedDataParallel``, whose wrapper
            :meth:`shrink` replaces: call it yourself there.

    Raises:
        TypeError: ``optimizer`` is not a sparsetrain optimizer; ``model``, ``method``, ``include``,
            ``exclude``, ``types`` or ``ratios`` of the wrong kind.
        ValueError: a pattern that matches no module, a ratio outside ``[0, 1)`` (or two for one tied
            weight), no weight selected,
            a selected weight that is not in the optimizer, a layout the method cannot handle, or
            ``shrink_after_prune`` where shrinking is not possible, a ``method`` object that already
            drives another attached Pruner, a weight that another attached Pruner or MaskedPruner
            prunes (all before anything is modified). A method object whose
            Pruner was removed (:meth:`remove`) can drive a new one: its schedule starts afresh, as a
            new object's would (unless the optimizer's state_dict carries a saved schedule to continue).

    Attributes:
        targets (list[Target]): the pruned tensors, in model order (structured: every member of
            every channel group, biases and normalization entries included). A tensor shared by
            several modules (tied weights) is one target, under its first name in ``named_parameters()``.
        groups (CoupledGroups | None): the channel groups of a structured method.
        history (History): per-layer sparsity, dead outputs and inputs, and method scalars over steps.
        step_count (int): optimizer steps taken since the pruner was attached.
        shrinks (list[dict[str, list[int]]]): every :meth:`shrink` so far: per channel group (root
            layer name), the channels removed, numbered as they were then (saved in the state).

    Example:
        ```python
        opt = sparsetrain.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.8, schedule="cubic", end=2000),
                                    exclude=["fc"])
        ...  # the usual loop: loss.backward(); opt.step(); opt.zero_grad()
        print(pruner.summary())
        ```
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        method: Method,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        types: tuple[type[nn.Module], ...] = DEFAULT_TYPES,
        ratios: dict[str, float] | None = None,
        record_every: int = 10,
        example_inputs: Any = None,
        coupled: bool = True,
        shrink_after_prune: bool = False,
    ) -> None:
        if not isinstance(optimizer, FusedOptimizer):
            raise TypeError(
                f"Pruner needs a sparsetrain optimizer (sparsetrain.optim.SGD / Adam / AdamW), got "
                f"{type(optimizer).__module__}.{type(optimizer).__name__}; to keep your own optimizer, "
                "use the autograd path: sparsetrain.autograd.MaskedPruner(model, method)"
            )
        include, exclude, types, ratios = selection_args(model, method, include, exclude, types, ratios)
        if _attached(_DRIVEN_BY.get(method)) is not None:
            raise ValueError(
                f"this {type(method).__name__} object already drives another Pruner, and a method keeps its "
                "schedule's state: create one method object per Pruner (or call the other Pruner's remove() first)"
            )
        self.model, self.optimizer, self.method = model, optimizer, method
        self.trace_kwargs = {"include": include, "exclude": exclude, "types": types, "ratios": ratios,
                             "example_inputs": example_inputs, "coupled": coupled}  # fmt: skip
        resolved = getattr(self, "_resolved", None)
        if resolved is None:
            check_unmasked(model)
        self.targets, self.groups = resolved or resolve_targets(
            model,
            method,
            include=include,
            exclude=exclude,
            types=types,
            ratios=ratios,
            example_inputs=example_inputs,
            coupled=coupled,
        )
        owned = set(optimizer._param_index())
        for target in self.targets:  # everything is checked before the optimizer is touched
            if target.param not in owned:
                frozen = (
                    f" (requires_grad=False: to leave a frozen layer out of pruning, exclude it: "
                    f"exclude=[{target.module_name!r}])"
                    if not target.param.requires_grad
                    else ""
                )
                raise ValueError(
                    f"{target.name} {tuple(target.param.shape)} is not a parameter of the optimizer{frozen}"
                )
        if optimizer.pruner is not None:
            raise ValueError("the optimizer already has a Pruner attached; call its remove() first")
        for target in self.targets:
            other = _attached(_PRUNED_BY.get(target.param))
            if other is not None:  # an optimizer and Pruner nothing refers to any more wait for the cycle collector
                del other
                gc.collect()
                other = _attached(_PRUNED_BY.get(target.param))
            if other is not None:
                raise ValueError(
                    f"{target.name} is already pruned by another {type(other).__name__} (of optimizer "
                    f"{type(other.optimizer).__name__}): one pruner per weight; call its remove() first"
                )
        self.shrink_after_prune = bool(shrink_after_prune)
        if self.shrink_after_prune:
            self._check_auto_shrink()
        self.shrinks: list[dict[str, list[int]]] = []
        self._structured_event = False
        self._read_versions: dict[Tensor, bytes] = {}  # version of each target when weight() last zeroed its dead
        saved = optimizer.loaded_pruner_state
        if saved is not None:
            self._check_names(saved)
        # masks already in the optimizer's state: a resumed run, whatever its sparsity now
        resumed = saved is not None or any("mask_words" in optimizer.state.get(t.param, {}) for t in self.targets)
        if not resumed:
            method.check(self.targets)
            if self.groups is not None:
                method.check_groups(self.groups)
        history_targets = [t for t in self.targets if t.param.dim() >= 2]
        self.history = History(history_targets, every=record_every, weight_of=self.effective_weight)
        for target in self.targets:
            optimizer.enable_pruning(target.param, groups=target.groups, group_inner=target.inner)
        optimizer.uses_groups = optimizer.uses_groups or method.uses_groups
        self.step_count = 0
        self._skipped = False
        method.remember_initial_state()
        if saved is not None:  # the optimizer's state_dict carried this pruner's state: continue from it
            self.load_schedule_state_dict(saved)
            optimizer.loaded_pruner_state = None
        else:  # a new schedule, also for a method object a removed Pruner drove before
            method.restart()
            method.attach(self)
        optimizer.pruner = self
        _DRIVEN_BY[method] = weakref.ref(self)
        for target in self.targets:
            _PRUNED_BY[target.param] = _DRIVEN_BY[method]
        self._hooks = [optimizer.register_step_pre_hook(self._before), optimizer.register_step_post_hook(self._after)]
        if self._shrink_in_init:
            self._maybe_shrink()

    _shrink_in_init = True  # a MaskedPruner shrinks once its masks are in place

    def _check_auto_shrink(self) -> None:
        if self.groups is None or not self.trace_kwargs["coupled"]:
            raise ValueError(
                "shrink_after_prune=True needs a structured method on coupled channel groups "
                "(structure='filters', coupled=True, example_inputs=)"
            )
        if isinstance(self.model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            raise ValueError(
                "shrink_after_prune=True cannot replace a DistributedDataParallel wrapper your loop holds: "
                "call model = pruner.shrink() yourself after the pruning event"
            )

    def _maybe_shrink(self, optimizers: Sequence[Any] = ()) -> None:
        """After a structured pruning event, :meth:`shrink` when ``shrink_after_prune`` asks for it."""
        event, self._structured_event = self._structured_event, False
        if event and self.shrink_after_prune:
            self.shrink(optimizers=optimizers)

    # -- hooks (under torch.compile the step's opaque op calls _pre_step / _post_step itself)
    def _before(self, optimizer, args, kwargs) -> tuple[tuple, dict] | None:
        if torch.compiler.is_compiling():
            return None
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0] is the optimizer
        if closure is None:
            self._skipped = self._pre_step()
            return None

        def closure_then_schedule():  # the gradients exist once the closure ran: a non-finite step is seen
            loss = closure()
            self._skipped = self._pre_step()
            return loss

        if len(args) > 1:
            return (args[0], closure_then_schedule, *args[2:]), kwargs
        return args, {**kwargs, "closure": closure_then_schedule}

    def _after(self, optimizer, args, kwargs) -> None:
        if not torch.compiler.is_compiling():
            self._post_step(self._skipped)

    def _pre_step(self) -> bool:
        """Run the schedule for this step unless the step will be skipped (returned). With a closure, the
        step's hook runs it after the closure (:meth:`_before`), once the gradients exist."""
        self.optimizer.check_step()  # a step that will be refused changes nothing, the schedule included
        sync = self.sync
        if sync is not None and self.method.needs_stats(self.step_count):
            sync.request_stats()  # summed across ranks with the step's first collective
        if self.optimizer.nonfinite_grads():
            return True  # a skipped step changes nothing: the schedule waits for the next step that runs
        self.method.before_step(self, self.step_count)
        self._structured_event |= self.optimizer._pending_prune == "group"
        return False

    def _post_step(self, skipped: bool) -> None:
        if skipped:
            return
        self.method.after_step(self, self.step_count)
        self.step_count += 1
        self.history.maybe_record(self.step_count, self.method.scalars())
        self._maybe_shrink()

    def remove(self) -> None:
        """Detach from the optimizer (masks stay in its state). The method object can then drive a new
        Pruner, whose schedule starts afresh."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.optimizer.pruner is self:
            self.optimizer.pruner = None

    def stats_to_compute(self) -> int:
        """The statistics the coming optimizer step must compute, a bit set of ``contract.STATS_*``: those
        the method reads on the next step (:meth:`Method.stats_read`). Steps compute only these (the
        others are stored as 0) and none when it is 0; a step that reads the previous step's (a
        stochastic event) reads them whatever it computes."""
        return self.method.stats_read(self.step_count + 1)

    def wants_stats(self) -> bool:
        """Whether the coming optimizer step must compute any statistic (:meth:`stats_to_compute`)."""
        return bool(self.stats_to_compute())

    # -- what methods use
    def coefs(self, target: Target) -> Tensor:
        """The target's per-tensor coefficients (float32 ``[NUM_COEFS]`` in the optimizer state; writable)."""
        return self.optimizer.state[target.param]["coefs"]

    def weight(self, param: Tensor) -> Tensor:
        """``param`` as methods score it: every pruned element +0.0.

        A write since the last read can leave pruned elements nonzero: a ``MaskedPruner``'s torch
        optimizer moves the masked originals (momentum, Adam, decoupled weight decay), a user loads a
        dense checkpoint. Such a tensor's pruned elements are zeroed here in place (they are masked
        or dead anyway), once per write (the version counter), so that no score, threshold or
        statistic counts a pruned weight. Returns ``param`` itself.
        """
        shard = distributed.local(param)
        dead.rezero_written([shard], self._read_versions.get(param), self.optimizer.state, [param])
        self._read_versions[param] = dead.versions([shard])
        return param

    def group_scores(self, norm: float = 1.0, *, mean: bool = False) -> list[Tensor]:
        """Per channel group, per unit: :meth:`CoupledGroups.scores` of the weights as :meth:`weight` reads them."""
        return self.groups.scores(norm, mean=mean, sync=self.sync, weight_of=self.weight)

    @property
    def sync(self) -> distributed.ShardSync | None:
        """Cross-rank bookkeeping when the parameters are DTensor shards (FSDP2), else None."""
        return distributed.sync_of(self.optimizer)

    def stats(self, target: Target) -> Tensor:
        """The target's statistics of the last step that computed them (float64 ``[NUM_STATS]`` on its
        device; steps compute only those the method reads, the others are 0, see :meth:`stats_to_compute`).

        With DTensor shards they are summed across ranks first when a step requested it.
        """
        if self.sync is not None:
            self.sync.flush()
        return self.optimizer.state[target.param]["stats"]

    def write_group_rows(self, row: int, per_group: list[Tensor], reduce: str = "sum") -> None:
        """Write per-unit values (one vector per channel group) into every member tensor's group table."""
        self.groups.write_rows(self.optimizer, row, per_group, reduce)

    def set_group_alive(self, alive: list[Tensor]) -> None:
        """Prune, now, every member slice of the units where ``alive`` (one bool vector per group) is False."""
        self.groups.set_alive(self.optimizer, alive)
        self._structured_event = True

    def alive_units(self) -> list[Tensor]:
        """Per channel group, bool per unit: not pruned yet (empty for unstructured pruning)."""
        return self.groups.alive_units(self.optimizer.mask) if self.groups is not None else []

    # -- public API
    def mask(self, name_or_param: str | Tensor) -> Tensor:
        """The bool mask (True = alive) of a target, by parameter name, module name or tensor.

        Args:
            name_or_param: ``"features.0.weight"``, ``"features.0"`` or the parameter itself (a tied
                weight: any of its names).

        Returns:
            A new bool tensor of the weight's shape (unpacked from the 1-bit mask).

        Raises:
            KeyError: the weight is not pruned by this pruner.
        """
        for target in self.targets:
            names = (target.name, target.module_name, *target.aliases, *(a.rpartition(".")[0] for a in target.aliases))
            if name_or_param is target.param or name_or_param in names:
                return self.optimizer.mask(target.param)
        raise KeyError(
            f"{name_or_param if isinstance(name_or_param, str) else 'the tensor'} is not pruned by this pruner"
        )

    def metrics(self) -> dict[str, dict[str, float]]:
        """Per target now: weight sparsity, dead output nodes / filters, dead input channels.

        Returns:
            ``{parameter name: {"weight_sparsity": f, "dead_outputs": f, "dead_inputs": f}}``, each a
            fraction in ``[0, 1]``. :meth:`summary` prints the same as a table. A 1-D member of a
            channel group (bias, normalization entries) counts its masked entries (:meth:`dead_elements`).

        With FSDP2 shards the fractions are those of the full tensors, summed across ranks in one
        collective: every rank must call it. With DDP (or one process) it reads local tensors only.
        """
        if self.sync is not None:  # FSDP2 shards: global counts, one collective (every rank calls metrics())
            zeros = [self.dead_elements(t) for t in self.targets]
            counts = distributed.zero_counts(zeros, [t.param for t in self.targets])
            return {
                t.name: {
                    "weight_sparsity": c["zeros"] / max(c["numel"], 1),
                    "dead_outputs": c["dead_rows"] / max(c["rows"], 1),
                    "dead_inputs": c["dead_cols"] / c["cols"] if c["cols"] else 0.0,
                }
                for t, c in zip(self.targets, counts)
            }
        return {
            t.name: {k: float(v) for k, v in layer_metrics(t, ~self.dead_elements(t)).items()} for t in self.targets
        }

    def dead_elements(self, target: Target) -> Tensor:
        """Bool tensor (the local shard with FSDP2): the target's elements :meth:`metrics` and
        :meth:`summary` count as zero.

        A weight (2-D or more): zero as the model computes with it, or masked. A 1-D member (a
        bias, a normalization layer's scale or shift): masked only, since such an entry can be 0
        and alive (BatchNorm's shift starts at 0).
        """
        mask = distributed.local(self.optimizer.mask(target.param))
        if target.param.dim() < 2:
            return ~mask
        return (distributed.local(self.effective_weight(target)).detach() == 0) | ~mask

    def summary(self, example_inputs: Tensor | tuple | None = None) -> str:
        """A per-layer table as text: name, shape, weight sparsity, dead outputs / inputs, parameters, MACs.

        Args:
            example_inputs: optional batch the model accepts (a tensor or a tuple of positional
                inputs). With it the model runs once (eval mode, no grad) and the table adds
                multiply-accumulates per sample, dense and counting only nonzero weights.

        Returns:
            The table, one line per pruned weight and a total line (see
            :func:`sparsetrain.summary.layer_rows` for the numbers as data). Nothing is modified.
        """
        from .summary import summary

        return summary(self, example_inputs)

    def export(self, example_inputs: Tensor | None = None, *, structured: bool | None = None) -> nn.Module:
        """A copy of the model with the masks folded in; structured methods: a physically smaller model.

        Args:
            example_inputs: a batch the model accepts; needed by structured export (to trace the
                dependency graph and to check that the smaller model computes the same outputs).
            structured: remove pruned filters / nodes (and the matching inputs of their consumers)
                with Torch-Pruning; default ``None``: ``True`` for structured methods.

        Returns:
            A new module; the pruner's model is not modified and keeps training.

        Raises:
            ValueError: structured export without ``example_inputs``.
            RuntimeError: removing the dead outputs would change the model's outputs.

        See :func:`sparsetrain.export.export`.
        """
        from .export import export

        return export(self, example_inputs, structured=structured)

    def shrink(self, *, optimizers: Sequence[Any] = (), example_inputs: Any = None) -> nn.Module:
        """Remove the pruned channels from the live model now and slice everything indexed by them.

        Parameters (the same objects, smaller), their ``.grad``, the optimizer's state (buffers,
        masks, group tables), the channel groups and the method's per-channel state follow; training
        continues with the same optimizer, scheduler and pruning schedule. See :mod:`sparsetrain.shrink`.

        Args:
            optimizers: further optimizers whose state is sliced (a ``MaskedPruner``'s torch optimizer).
            example_inputs: inputs to trace the model with (default: those given at creation).

        Returns:
            The model to train from now on (a new ``DistributedDataParallel`` wrapper when the model
            was wrapped; the model itself otherwise).

        Raises:
            sparsetrain.shrink.ShrinkError: shrinking is not possible (unstructured method,
                ``coupled=False``, compiled model, FSDP2, ...); nothing is modified.
        """
        from .shrink import shrink

        return shrink(self, optimizers=optimizers, example_inputs=example_inputs)

    def effective_weight(self, target: Target) -> Tensor:
        """The weight the model computes with (here the parameter itself; masked by the fused step)."""
        return target.param

    def state_dict(self) -> dict[str, Any]:
        """Step count, method schedule and history (a copy). Also saved in the optimizer's state_dict."""
        return self.schedule_state_dict()

    def check_state_dict(self, state: Any) -> None:
        """Raise a clear error if ``state`` does not fit this pruner; nothing is changed."""
        if not isinstance(state, dict) or not {"step_count", "method", "history"} <= state.keys():
            raise ValueError("pruner state must be a dict with 'step_count', 'method' and 'history'")
        integer("pruner state: step_count", state["step_count"], low=0)
        method_state = state["method"]
        expected = set(self.method.state_dict())
        if not isinstance(method_state, dict) or not set(method_state) <= expected:
            got = sorted(method_state) if isinstance(method_state, dict) else type(method_state).__name__
            raise ValueError(
                f"pruner state: the {type(self.method).__name__} state has {got}; expected some of {sorted(expected)}"
            )
        self.history.check_state_dict(state["history"])
        if "shrinks" in state:
            from .shrink import check_records

            check_records(state["shrinks"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (same targets)."""
        self.load_schedule_state_dict(state)

    def schedule_state_dict(self) -> dict[str, Any]:
        """What the optimizer's state_dict carries for this pruner: step count, method state, history."""
        return copy.deepcopy(
            {
                "targets": [t.name for t in self.targets],
                "step_count": self.step_count,
                "method": self.method.state_dict(),
                "history": self.history.state_dict(),
                "shrinks": self.shrinks,
            }
        )

    def load_schedule_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`schedule_state_dict` returned (same targets)."""
        self._check_names(state)
        self.check_state_dict(state)  # checked whole first: nothing changes if it does not fit
        state = copy.deepcopy(state)
        self.step_count = state["step_count"]
        self.method.load_state_dict(state["method"])
        self.history.load_state_dict(state["history"])
        self.shrinks = list(state.get("shrinks", []))
        for g in self.groups.groups if self.groups is not None else []:
            g.removed = sum(len(record.get(g.name, [])) for record in self.shrinks)

    def _check_names(self, state: dict[str, Any]) -> None:
        names = state.get("targets")
        if names is not None and list(names) != [t.name for t in self.targets]:
            here = [t.name for t in self.targets]
            raise ValueError(f"the saved pruner state prunes {list(names)[:4]}..., this pruner {here[:4]}...")


def layer_metrics(target: Target, weight: Tensor | None = None) -> dict[str, Tensor]:
    """Device-side metrics of one target (no host sync): sparsity, dead outputs, dead inputs.

    ``weight``: the weight as the model uses it (default the parameter).
    """
    w = distributed.local(target.param if weight is None else weight).detach()  # FSDP2: the rank's shard
    if not distributed.is_sharded(target.param):  # outputs along dim 0 (Conv1D, ConvTranspose: not as stored)
        w = output_major(target.module, w)
    zero = w == 0
    rows = zero.reshape(w.shape[0], math.prod(w.shape[1:])).all(dim=1)  # an FSDP2 shard may have no rows
    out = {"weight_sparsity": zero.float().mean(), "dead_outputs": rows.float().mean()}
    if w.dim() >= 2:
        out["dead_inputs"] = zero.transpose(0, 1).reshape(w.shape[1], -1 if w.numel() else 0).all(dim=1).float().mean()
    else:
        out["dead_inputs"] = torch.zeros((), device=w.device)
    return out
