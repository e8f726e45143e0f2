"""The autograd path, for users who keep their own optimizer (torch's fused AdamW, 8-bit, anything).

``MaskedPruner(model, method)`` makes each pruned weight a masked weight: its forward is
``w * mask`` and its backward returns ``(grad + l2*w + l1*sign(w)) * mask`` — the masked gradient
plus the method's regularization gradient, in one op (``sparsetrain::masked_weight``, registered
with torch.library and ``register_autograd``). Call ``pruner.step()`` after your optimizer's step:
it runs the method's schedule and updates the masks with the same fused op, sampling stream and
thresholds as the optimizer path (a zero-learning-rate fused step that only decides and masks).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import backends, scan
from . import masks as mask_format
from .contract import COEF_L1, COEF_L2, STATS_ALL
from .methods.base import Method
from .optim.sgd import SGD
from .pruner import DEFAULT_TYPES, Pruner, Target, check_unmasked, resolve_targets

WORDS_PER_BLOCK = 32  # 1024 elements per Triton program


def _masked_weight_torch(weight: Tensor, mask_words: Tensor) -> Tensor:
    return weight * mask_format.unpack(mask_words, weight.numel(), weight.shape)


def _masked_weight_grad_torch(grad: Tensor, weight: Tensor, mask_words: Tensor, coefs: Tensor) -> Tensor:
    alive = mask_format.unpack(mask_words, weight.numel(), weight.shape)
    coefs = coefs.to(weight.dtype)
    return (grad + coefs[COEF_L2] * weight + coefs[COEF_L1] * torch.sign(weight)) * alive


@torch.library.custom_op("sparsetrain::masked_weight", mutates_args=())
def masked_weight(weight: Tensor, mask_words: Tensor, coefs: Tensor) -> Tensor:
    """``weight * mask`` (mask bit-packed); the backward adds the L2/L1 regularization gradient."""
    return _masked_weight_torch(weight, mask_words)


@masked_weight.register_fake
def _(weight, mask_words, coefs):
    return torch.empty_like(weight)


@torch.library.custom_op("sparsetrain::masked_weight_grad", mutates_args=())
def masked_weight_grad(grad: Tensor, weight: Tensor, mask_words: Tensor, coefs: Tensor) -> Tensor:
    """``(grad + l2 * weight + l1 * sign(weight)) * mask``, with l2 and l1 from ``coefs``."""
    return _masked_weight_grad_torch(grad, weight, mask_words, coefs)


@masked_weight_grad.register_fake
def _(grad, weight, mask_words, coefs):
    return torch.empty_like(weight)


def _triton_grid(weight: Tensor) -> tuple[int]:
    return (max(1, -(-weight.numel() // (WORDS_PER_BLOCK * 32))),)


def masked_weight_triton(weight: Tensor, mask_words: Tensor, coefs: Tensor) -> Tensor:
    """The one-pass Triton forward (CUDA tensors, or CPU under TRITON_INTERPRET=1)."""
    from .kernels.masked_weight import masked_weight_forward_kernel

    weight = weight.contiguous()
    out = torch.empty_like(weight)
    masked_weight_forward_kernel[_triton_grid(weight)](weight, mask_words, out, weight.numel(), WORDS=WORDS_PER_BLOCK)
    return out


def masked_weight_grad_triton(grad: Tensor, weight: Tensor, mask_words: Tensor, coefs: Tensor) -> Tensor:
    """The one-pass Triton backward (CUDA tensors, or CPU under TRITON_INTERPRET=1)."""
    from .kernels.masked_weight import masked_weight_backward_kernel

    grad, weight = grad.contiguous(), weight.contiguous()
    out = torch.empty_like(weight)
    masked_weight_backward_kernel[_triton_grid(weight)](
        grad, weight, mask_words, coefs, out, weight.numel(), WORDS=WORDS_PER_BLOCK, enable_fp_fusion=True
    )
    return out


@masked_weight.register_kernel("cuda")
def _(weight, mask_words, coefs):
    if backends.availability("triton")[0]:
        return masked_weight_triton(weight, mask_words, coefs)
    return _masked_weight_torch(weight, mask_words)


@masked_weight_grad.register_kernel("cuda")
def _(grad, weight, mask_words, coefs):
    if backends.availability("triton")[0]:
        return masked_weight_grad_triton(grad, weight, mask_words, coefs)
    return _masked_weight_grad_torch(grad, weight, mask_words, coefs)


def _setup_context(ctx, inputs, output) -> None:
    weight, mask_words, coefs = inputs
    ctx.save_for_backward(weight, mask_words, coefs)


def _backward(ctx, grad: Tensor):
    weight, mask_words, coefs = ctx.saved_tensors
    if grad.layout != torch.strided:
        raise RuntimeError(
            f"a masked weight {tuple(weight.shape)} received a {grad.layout} gradient (an nn.Embedding / EmbeddingBag "
            "with sparse=True): the masked gradient plus its regularization is dense; set sparse=False on the module"
        )
    return masked_weight_grad(grad, weight, mask_words, coefs), None, None


masked_weight.register_autograd(_backward, setup_context=_setup_context)


class _MaskParametrization(nn.Module):
    """``w * mask`` for one pruned tensor; the mask is read from the pruner's optimizer state at
    every call, so a loaded state (new tensors) takes effect at once."""

    def __init__(self, optimizer: SGD, param: Tensor, grad_scaler: Any = None) -> None:
        super().__init__()
        self._optimizer = optimizer
        self._param_ref = [param]  # not a submodule attribute: the parameter stays owned by the model
        self._scaler = [grad_scaler]

    def forward(self, weight: Tensor) -> Tensor:
        state = self._optimizer.state[self._param_ref[0]]
        coefs = state["coefs"]
        scale = _loss_scale(self._scaler[0])
        if scale is not None:  # the loss is scaled: so is the regularization gradient
            coefs = coefs * (scale.to(coefs.device) if isinstance(scale, Tensor) else scale)
        return masked_weight(weight, state["mask_words"], coefs)


def _loss_scale(scaler: torch.amp.GradScaler | None) -> Tensor | float | None:
    """The factor ``scaler.scale(loss)`` multiplies the loss by: the device tensor the scaler updates in place
    (no host read), its initial value before its first ``scale()``, ``None`` without an enabled scaler. Read
    from the scaler's attributes, not its methods, which torch.compile does not trace (a graph break each call)."""
    if scaler is None or not getattr(scaler, "_enabled", True):
        return None
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, Tensor) else float(getattr(scaler, "_init_scale", 1.0))


def _holders(model: nn.Module, param: Tensor) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) of ``model`` holding ``param`` (tied weights: several)."""
    found = []
    for module in model.modules():
        for name, value in module._parameters.items():
            if value is param:
                found.append((module, name))
    return found


def _release_flat_weights(module: nn.Module, args: Any, output: Any) -> None:
    """After a masked ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` forward: the weights it caches in ``_flat_weights``
    (the masked ones, made in the autograd graph, which ``copy.deepcopy`` refuses) are kept detached, so the
    module can be copied (``AveragedModel``, :meth:`~sparsetrain.Pruner.export`); the next forward masks again."""
    module._flat_weights = [w if w is None else w.detach() for w in module._flat_weights]


def _refuse_sparse_gradients(model: nn.Module, targets: list[Target]) -> None:
    """Refuse a pruned tensor held by a module that makes sparse gradients (``nn.Embedding(sparse=True)``):
    the masked gradient plus its regularization gradient is dense."""
    for t in targets:
        for module, _ in _holders(model, t.param):
            if getattr(module, "sparse", False) is True:
                name = next((n for n, m in model.named_modules() if m is module), type(module).__name__)
                raise ValueError(
                    f"MaskedPruner: {t.name} is held by {name!r} ({type(module).__name__}, sparse=True), whose "
                    f"gradients are sparse, but a masked weight's gradient (masked, plus the regularization "
                    f"gradient) is dense: build it with sparse=False, or exclude it (exclude=[{name!r}]); nothing "
                    "was modified"
                )


def _plain_state_dict_hook(name: str):
    """State-dict post-hook of a masked module: its ``name`` under the plain key, with masked values."""

    def hook(module, state_dict, prefix, local_metadata) -> None:
        original = f"{prefix}parametrizations.{name}.original"
        if original in state_dict:
            del state_dict[original]
            state_dict[prefix + name] = getattr(module, name).detach()

    return hook


def _plain_load_hook(name: str):
    """Load pre-hook of a masked module: a plain ``name`` entry loads into the parametrization's original."""

    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        plain, original = prefix + name, f"{prefix}parametrizations.{name}.original"
        if plain in state_dict and original not in state_dict:
            state_dict[original] = state_dict.pop(plain)

    return hook


class MaskedPruner(Pruner):
    """Prune with any optimizer: masked weights in the forward, masks updated by :meth:`step`.

    Each selected module's ``weight`` becomes a masked weight through ``torch.nn.utils.parametrize``:
    the forward computes ``w * mask`` and the backward returns
    ``(grad + l2 * w + l1 * sign(w)) * mask`` (the method's L2 / L1 coefficients), both in one op
    (``torch.ops.sparsetrain.masked_weight``; one-pass Triton kernels on CUDA). Your optimizer then
    updates the weights as usual; call :meth:`step` after it: it runs the method's schedule and, at
    pruning events, updates the masks with the same fused op, random stream and thresholds as the
    fused optimizers (two zero-learning-rate fused steps that only decide and mask, and zero the
    pruned weights in place).

    Create it before your optimizer's first step. The parameters stay the same tensors (torch's
    parametrization keeps each original as ``module.parametrizations.weight.original``), so an
    optimizer built before or after the pruner sees them.

    * Every module that holds a pruned weight computes with the masked weight, tied modules too
      (GPT-2's ``wte`` and ``lm_head``); with structured filters, the filters' biases are masked too.
    * ``model.state_dict()`` has the plain keys (``lm_head.weight``) holding the masked values, so
      ``torch.save`` / ``save_pretrained`` reload into a plain model, and the live model loads them.
    * :meth:`state_dict` holds the masks, the statistics and the schedule; :meth:`metrics` and the
      history measure the masked weights, whatever the optimizer does to the originals.

    Your optimizer's state for pruned weights is not masked (the masked gradient is zero, so they
    receive no gradient; their decoupled weight decay and momentum may move the stored value,
    which the forward masks). Methods never score those moved values: before a method reads a
    weight (scores, thresholds, GReg's magnitudes) its pruned originals are set to zero in place
    (:meth:`~sparsetrain.Pruner.weight`).

    Per-group penalties (GReg's ``lam``) and selective decay act inside the fused optimizers'
    update; with this path use methods whose regularization is L2 / L1 or none
    (:class:`~sparsetrain.methods.Magnitude`, :class:`~sparsetrain.methods.StochasticMagnitude`).

    Args:
        model: the model whose weights are pruned.
        method: the pruning method.
        include: module-name patterns of the modules pruned (default ``None``: every module of ``types``).
        exclude: module-name patterns left out (default ``None``).
        types: module classes pruned by default (default ``nn.Linear``, ``nn.Conv1d/2d/3d``).
        ratios: per-module-pattern target ratios overriding the method's ``target``.
        record_every: steps between two history records (default ``10``).
        backend: backend of the mask updates (default ``None``: ``SPARSETRAIN_BACKEND`` or ``"auto"``).
        seed: base seed of the pruning random stream (default ``0``).
        example_inputs: for structured methods, inputs to trace the coupled channel groups with.
        coupled: ``False`` prunes each structured layer's own filters without tracing (default ``True``).
        shrink_after_prune: remove the pruned channels from the live model after every structured
            pruning event (:meth:`~sparsetrain.Pruner.shrink`); pass your optimizer to :meth:`step`
            so its state is sliced too: a step without an optimizer that has stepped the pruned
            parameters is refused (default ``False``).
        grad_scaler: the ``torch.amp.GradScaler`` whose ``scale(loss)`` the backward runs through (default
            ``None``): the regularization gradient (L2 / L1) is then scaled with the loss, so that the
            scaler's ``unscale_`` leaves it as it is unscaled. Without it, under a scaler the regularization
            gradient comes out divided by the scale.

    Raises:
        TypeError: ``grad_scaler`` that is not a ``torch.amp.GradScaler``.
        ValueError: as :class:`~sparsetrain.Pruner` (bad patterns or ratios, nothing selected); a pruned
            tensor held by a module that makes sparse gradients (``nn.Embedding(sparse=True)``).

    Example:
        ```python
        pruner = MaskedPruner(model, methods.Magnitude(0.8, schedule="cubic", end=2000, interval=100))
        opt = torch.optim.AdamW(model.parameters(), fused=True)
        for x, y in loader:
            loss_fn(model(x), y).backward()
            opt.step()
            pruner.step()
            opt.zero_grad()
        ```
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        types: tuple[type[nn.Module], ...] = DEFAULT_TYPES,
        ratios: dict[str, float] | None = None,
        record_every: int = 10,
        backend: str | None = None,
        seed: int = 0,
        example_inputs: Any = None,
        coupled: bool = True,
        shrink_after_prune: bool = False,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
        check_unmasked(model)
        self._resolved = resolve_targets(
            model,
            method,
            include=include,
            exclude=exclude,
            types=types,
            ratios=ratios,
            example_inputs=example_inputs,
            coupled=coupled,
        )
        _refuse_sparse_gradients(model, self._resolved[0])
        params = [t.param for t in self._resolved[0]]
        self._mask_optimizer = SGD(params, lr=0.0, backend=backend, seed=seed, skip_nonfinite=True)
        super().__init__(
            model,
            self._mask_optimizer,
            method,
            include=include,
            exclude=exclude,
            types=types,
            ratios=ratios,
            record_every=record_every,
            example_inputs=example_inputs,
            coupled=coupled,
            shrink_after_prune=shrink_after_prune,
        )
        self._zero_grads: dict[Tensor, Tensor] = {}
        for hook in self._hooks:  # the schedule runs from step(), not from the internal optimizer's hooks
            hook.remove()
        self._hooks = []
        recurrent: set[int] = set()
        for t in self.targets:
            for tensor in (t.param, t.bias):
                if tensor is None:
                    continue
                for module, attr in _holders(model, tensor):
                    mask = _MaskParametrization(self.optimizer, tensor, grad_scaler)
                    parametrize.register_parametrization(module, attr, mask)
                    self._hooks.append(module.register_state_dict_post_hook(_plain_state_dict_hook(attr)))
                    self._hooks.append(module.register_load_state_dict_pre_hook(_plain_load_hook(attr)))
                    if isinstance(module, nn.RNNBase) and id(module) not in recurrent:
                        recurrent.add(id(module))
                        self._hooks.append(module.register_forward_hook(_release_flat_weights))
                        # torch.compile traced a masked recurrent layer into a crash (heap corruption): it runs
                        # eagerly inside a compiled model. The class is the module's own (made by parametrize).
                        type(module).forward = torch.compiler.disable(type(module).forward)
        self._maybe_shrink()
        self._stepping: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._versions: bytes | None = None  # the pruned tensors' version counters when step() last ran
        self._optimizer_steps = 0  # eager steps of the optimizers in _stepping (a fused torch step bumps no version)
        self._steps_seen = 0  # _optimizer_steps when step() last ran
        self._watch_optimizers()

    _shrink_in_init = False

    def _watch_optimizers(self) -> None:
        """Note every other optimizer that steps a pruned tensor, and count its eager steps (a global step hook):
        :meth:`step` can then refuse to go on without one before a shrink leaves its state at the old shapes, and
        tell a step GradScaler skipped: no such step ran, the pruned tensors were not written (their version
        counters: a compiled step runs no hook bookkeeping, torch's fused CPU step bumps no version) and their
        gradients hold inf/NaN."""
        pruner = weakref.ref(self)
        targets = {id(t.param) for t in self.targets}
        checked: weakref.WeakKeyDictionary[torch.optim.Optimizer, int] = weakref.WeakKeyDictionary()

        def seen(optimizer, args, kwargs) -> None:
            if torch.compiler.is_compiling():  # a compiled step traces no bookkeeping (no graph break)
                return
            owner = pruner()
            if owner is None or optimizer is owner._mask_optimizer:
                return
            groups = len(optimizer.param_groups)
            if checked.get(optimizer) != groups:
                checked[optimizer] = groups
                if any(id(p) in targets for g in optimizer.param_groups for p in g["params"]):
                    owner._stepping.add(optimizer)
            if optimizer in owner._stepping:
                owner._optimizer_steps += 1

        handle = register_optimizer_step_post_hook(seen)
        weakref.finalize(self, handle.remove)
        self._hooks.append(handle)

    def _check_optimizers(self, optimizers: Sequence[Any]) -> None:
        """With ``shrink_after_prune``: every optimizer that has stepped the pruned tensors is passed."""
        missing = [o for o in self._stepping if all(o is not p for p in optimizers)]
        if missing:
            names = ", ".join(type(o).__name__ for o in missing)
            raise ValueError(
                f"MaskedPruner(shrink_after_prune=True): {names} steps the pruned parameters but was not passed to "
                "pruner.step(); a shrink would leave its state (momentum, Adam moments) at the old shapes. Call "
                "pruner.step(optimizer) with every optimizer of the model (nothing was changed)"
            )

    def stats_to_compute(self) -> int:
        """All of them, always: the internal optimizer steps only at events, twice (a refresh, then the
        decision), and what each step writes is read next (the decision reads the refresh's
        statistics, the next event's schedule the decision's)."""
        return STATS_ALL

    def effective_weight(self, target: Target) -> Tensor:
        """The masked weight the model computes with."""
        return target.param.detach() * self.optimizer.mask(target.param)

    def step(self, *optimizers: torch.optim.Optimizer) -> None:
        """Run the method's schedule for one training step; at pruning events update the masks.

        Steps without an event cost nothing here. An event takes two zero-learning-rate fused steps:
        one refreshes the statistics on the current weights, one decides and masks. A step that
        ``torch.amp.GradScaler`` skipped changes nothing, as a skipped step of the fused optimizers (the
        schedule and its events wait for the next step that runs): once an optimizer has stepped the pruned
        weights, a call after which none did, while their gradients hold inf/NaN, is such a step (call it
        before ``zero_grad()``, as in the loop below). With
        ``shrink_after_prune`` a structured event then shrinks the model; ``optimizers`` (yours)
        have their state sliced with it.

        Raises:
            TypeError: an argument that is not an optimizer (no ``param_groups`` / ``state``).
            ValueError: with ``shrink_after_prune``, an optimizer that has stepped the pruned
                parameters is not among ``optimizers`` (checked at every call, before anything changes).
        """
        for optimizer in optimizers:
            if not (hasattr(optimizer, "param_groups") and hasattr(optimizer, "state")):
                raise TypeError(
                    f"MaskedPruner.step(*optimizers) takes the optimizers that step the model (whose state a shrink "
                    f"slices), got {type(optimizer).__name__} {optimizer!r}"
                )
        if self.shrink_after_prune:
            self._check_optimizers(optimizers)
        params = [t.param for t in self.targets]
        stepped = self._optimizer_steps != self._steps_seen or scan.versions(params) != self._versions
        if self._stepping and not stepped and self._nonfinite_grads():
            return  # GradScaler skipped the optimizer's step (inf/NaN gradients): so does the schedule
        self._steps_seen = self._optimizer_steps
        self.method.before_step(self, self.step_count)
        mode = self._mask_optimizer._pending_prune
        self._structured_event |= mode == "group"
        if mode != "none":
            self._mask_optimizer._pending_prune = "none"
            self._mask_step()
            self._mask_optimizer.schedule_pruning(mode)
            self._mask_step()
        self.method.after_step(self, self.step_count)
        self.step_count += 1
        self.history.maybe_record(self.step_count, self.method.scalars())
        self._maybe_shrink(optimizers)
        self._versions = scan.versions(params)

    def _nonfinite_grads(self) -> bool:
        """Whether a pruned tensor's gradient holds inf/NaN (one host read)."""
        grads = [t.param.grad for t in self.targets if t.param.grad is not None]
        grads = [g for g in grads if g.layout == torch.strided and g.numel()]
        return bool(grads) and bool(self._mask_optimizer._found_inf(grads))

    def state_dict(self) -> dict[str, Any]:
        """Masks, statistics, coefficients, the event counter and the schedule (step count, method, history)."""
        return self._mask_optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned: the masks apply to the model at once."""
        if "sparsetrain" in state:
            self._mask_optimizer.load_state_dict(state)  # hands the schedule back to this pruner
        else:
            super().load_state_dict(state)

    def _mask_step(self) -> None:
        missing = [p for g in self._mask_optimizer.param_groups for p in g["params"] if p.grad is None]
        for p in missing:
            p.grad = self._zero_grads.setdefault(p, torch.zeros_like(p))
        try:
            self._mask_optimizer.step()
        finally:
            for p in missing:
                p.grad = None
