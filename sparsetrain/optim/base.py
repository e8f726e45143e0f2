"""Shared machinery of the drop-in fused optimizers: state, pruning state, validation, state_dict.

Per parameter ``p`` the optimizer state holds, besides the algorithm's own buffers:

* ``step``: float32 scalar tensor on ``p``'s device (incremented by the fused op);
* once pruning is enabled for ``p`` (:meth:`FusedOptimizer.enable_pruning`): ``mask_words``
  (int32, bit-packed), ``stats`` (float64 ``[NUM_STATS]``), ``coefs`` (float32 ``[NUM_COEFS]``),
  ``group_coefs`` (float32 ``[2, G]``) and ``group_inner`` (int).

The optimizer-wide pruning state (``base_seed``, the pruning-event counter) is saved under the
``"sparsetrain"`` key of :meth:`state_dict`. Everything is restored bit-identically by
:meth:`load_state_dict`.
"""

from __future__ import annotations

import copy
import math
import operator
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import backends, contract, distributed, philox, scan, validation
from .. import masks as mask_format
from ..transfer import to_device
from . import compat, compiled, dead, events, statistics

STATE_FORMAT = 1


@dataclass
class _Call:
    """One fused-op call: tensors of one param group, all masked or all unmasked, and their state lists."""

    group: dict[str, Any]
    params: list[Tensor]  # what the op steps: the tensors, or their local shards (FSDP2)
    sources: list[Tensor]  # the parameters themselves (their .grad is read)
    masked: bool
    where: list[str]  # "parameter i of param group j", for error messages
    indices: np.ndarray  # int64 positions in the optimizer's parameter order (seed derivation)
    lists: dict[str, Any]
    versions: bytes | None = None  # parameters' version counters after the last step (masked calls; scan.versions)

    def __post_init__(self) -> None:
        self.positions = positions = self.indices.tolist()
        first = positions[0]
        self._slice = slice(first, first + len(positions)) if positions[-1] - first == len(positions) - 1 else None
        self._pick = operator.itemgetter(*positions)

    def grads(self, every: list[Tensor | None]) -> list[Tensor]:
        """The call's gradients, taken from ``every`` parameter's (in the optimizer's parameter order)."""
        return every[self._slice] if self._slice is not None else list(self._pick(every))


class FusedOptimizer(torch.optim.Optimizer):
    """Base of :class:`~sparsetrain.optim.SGD`, :class:`~sparsetrain.optim.Adam`, :class:`~sparsetrain.optim.AdamW`.

    Keyword Args (shared by every subclass):
        backend (str | None): ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"``. Default ``None``: the
            environment variable ``SPARSETRAIN_BACKEND``, else ``"auto"`` (native, then triton, then torch for
            CUDA tensors; native, then torch for CPU tensors). An explicit backend that cannot run here raises
            :class:`~sparsetrain.BackendUnavailableError` with the reason, at construction.
        skip_nonfinite (bool): default ``False``. When ``True``, a step in which any gradient holds inf or
            NaN changes nothing (weights, states, masks, statistics, step counts); detected on the device,
            without a host sync per tensor.
        seed (int): default ``0``. Base seed of the pruning random stream (63 bits are kept); saved in
            the ``state_dict``, so a resumed run draws the same numbers.
        l1_proximal (bool): default ``True``: a method's L1 coefficient is applied as the proximal
            soft-threshold ``w = sign(w) * max(|w| - lr * l1, 0)`` after the update (exact zeros);
            ``False``: as the subgradient ``l1 * sign(w)`` added to the gradient.
        capturable (bool): default ``False``. Keep the learning rate on the device (a 0-dim float32
            tensor that schedulers update in place) so that ``step()`` can be captured in a CUDA graph;
            needs the triton backend on CUDA tensors. Pruning events run outside the graph.
        foreach (bool | None): accepted for compatibility with ``torch.optim``; a hint only (the step is
            always one fused op; ``backend`` chooses the implementation).
        fused (bool | None): as ``foreach``.
        differentiable (bool): ``True`` is refused (the fused step is not differentiable).
        state_dtype (torch.dtype | None): default ``None``: algorithm buffers (momentum, Adam moments,
            AMSGrad maxima) take each parameter's dtype, as in ``torch.optim``. ``torch.float32``: float32
            buffers for every parameter. The step computes in float32 either way and rounds each buffer
            once when it is stored. For bf16/fp16 parameters, float32 buffers double the buffers' memory
            and traffic (AdamW's moments: 4 -> 8 bytes per element in memory, 8 -> 16 bytes read and
            written per step) and keep the small changes a 16-bit buffer rounds away (bf16 keeps 8
            significant bits: a moment that changes by less than about 1/256 of its value per step
            does not move).

    Subclasses define ``_algo_states(group)`` (names of the per-parameter buffers the group
    needs) and ``_launch(group, params, grads, common)``, which calls their op once for a list of
    tensors.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        backend: str | None = None,
        skip_nonfinite: bool = False,
        seed: int = 0,
        l1_proximal: bool = True,
        capturable: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        backends.check_name(backend if backend is not None else "auto")
        self.state_dtype = validation.state_dtype(state_dtype)
        defaults = dict(defaults)
        compat.torch_keywords(defaults, foreach=foreach, fused=fused, differentiable=differentiable)
        defaults["capturable"] = capturable
        self.requested_backend = backend
        self.capturable = capturable
        self.skip_nonfinite = skip_nonfinite
        self.l1_proximal = l1_proximal
        self.base_seed = int(seed) & philox.MASK63
        self.prune_events = 0
        self.regularize = False  # set when any per-tensor l2 / l1 / selective-decay coefficient is used
        self.uses_sd = False  # selective decay reads the previous step's statistics every step
        self.shard_sync: distributed.ShardSync | None = None  # set when parameters are DTensor shards (FSDP2)
        self.uses_groups = False  # set when per-group lam or group pruning is used
        self._pending_prune = "none"
        self._found_inf_cache: Tensor | None = None
        self._accepted_layout: int | None = None  # _layout_version when a step's gradients last passed every check
        compiled.register(self)
        self.pruner: Any = None  # the attached Pruner, whose state travels with this optimizer's state_dict
        self.loaded_pruner_state: dict[str, Any] | None = None  # loaded before a Pruner was attached
        self._backend_by_device: dict[torch.device, str] = {}
        self._layout_version = 0
        self._calls_key: tuple | None = None
        self._calls_cache: list[_Call] = []
        self._no_seeds: dict[torch.device, Tensor] = {}
        self._check_hyperparameters(defaults, "defaults")
        super().__init__(params, defaults)
        first = next((p for g in self.param_groups for p in g["params"]), None)
        if first is not None:  # resolve now: an unusable backend fails here, and step() stays traceable
            name = self._backend_for(first.device)
            if capturable and name == "torch":
                raise ValueError(
                    "capturable=True needs the triton backend on CUDA tensors: the torch reference reads step "
                    "counts and found_inf on the host"
                )

    # ----------------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; everything is checked first, so a refused group leaves the optimizer unchanged."""
        index = len(self.param_groups)
        if not isinstance(param_group, dict):
            raise TypeError(f"param group {index} must be a dict, got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError(f"param group {index} has no 'params' entry")
        group = validation.full_group(param_group, self.defaults)
        group["params"] = compat.group_params(param_group["params"])  # a generator is read once, here
        params = compat.unnamed(group["params"])
        validation.group_params(params, index, self.param_groups)
        self._check_hyperparameters(group, f"param group {index}")
        if self.capturable and not isinstance(group["lr"], Tensor) and params:
            # CUDA-graph capture: the learning rate lives on the device, schedulers update it in place
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=params[0].device)
        super().add_param_group(group)
        self._layout_version += 1
        group = self.param_groups[-1]
        distributed.attach(self, group["params"])
        for p in group["params"]:
            self._init_state(p, group)

    def _check_hyperparameters(self, group: dict[str, Any], label: str) -> None:
        """Raise a clear error for an invalid hyperparameter of ``group`` (subclasses name their rules)."""
        validation.learning_rate(group, label)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for name in self._algo_states(group):
            if name not in state:
                state[name] = torch.zeros(distributed.local(p).shape, dtype=self.buffer_dtype(p), device=p.device)

    def buffer_dtype(self, p: Tensor) -> torch.dtype:
        """The dtype of ``p``'s algorithm buffers: ``state_dtype``, else ``p``'s dtype (as torch.optim)."""
        return self.state_dtype if self.state_dtype is not None else p.dtype

    def _param_index(self) -> dict[Tensor, int]:
        return {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    # ---------------------------------------------------------------------------------- pruning
    def enable_pruning(self, param: Tensor, *, groups: int = 1, group_inner: int | None = None) -> None:
        """Give ``param`` a mask (all alive), statistics, coefficients and ``groups`` groups.

        Element ``i`` belongs to group ``(i // group_inner) % groups``; ``group_inner`` defaults
        to ``numel // groups`` (contiguous groups, e.g. output filters). For a DTensor shard, ``i``
        indexes the full tensor and the mask and statistics cover the local shard.
        """
        label = validation.owned(self, param, "enable_pruning")
        numel = param.numel()
        groups, inner = validation.pruning_layout(label, numel, groups, group_inner)
        state = self.state[param]
        if "mask_words" in state:
            return
        device = param.device
        shard = distributed.local(param).detach()
        with torch.no_grad():
            stats = torch.zeros(contract.NUM_STATS, dtype=torch.float64, device=device)
            stats[contract.STAT_ALIVE] = shard.numel()
            stats[contract.STAT_SUM_ABS_W] = shard.double().abs().sum()
        state["mask_words"] = mask_format.full(shard.numel(), device)
        state["stats"] = stats
        state["coefs"] = torch.zeros(contract.NUM_COEFS, dtype=torch.float32, device=device)
        state["group_coefs"] = torch.zeros(2, groups, dtype=torch.float32, device=device)
        state["group_inner"] = int(inner)
        self._layout_version += 1
        if self.shard_sync is not None:
            self.shard_sync.rewritten([stats])

    def set_mask(self, param: Tensor, alive: Tensor) -> None:
        """Replace ``param``'s mask by the bool tensor ``alive`` and zero what it prunes (and its state).

        Pruned weights and their states become exactly +0.0, whatever they held (inf and NaN included).
        For a DTensor parameter ``alive`` may be a DTensor laid out like it, or a plain tensor of the
        full shape (each rank takes its rows).
        """
        label = validation.owned(self, param, "set_mask")
        validation.mask_for(label, param, alive)
        state = self.state[param]
        if "mask_words" not in state:
            self.enable_pruning(param)
        shard = distributed.local(param)
        alive = distributed.local_part(alive, param).to(device=param.device)
        with torch.no_grad():
            keep = alive & distributed.local(self.mask(param))
            state["mask_words"].copy_(mask_format.pack(keep))
            dead = ~keep
            shard.masked_fill_(dead, 0.0)
            for name in self._algo_state_names():  # by name: stats or coefs may have the parameter's shape
                if name in state:
                    state[name].masked_fill_(dead, 0.0)
            state["stats"][contract.STAT_ALIVE] = keep.sum()
            state["stats"][contract.STAT_SUM_ABS_W] = shard.double().abs().sum()
        if self.shard_sync is not None:
            self.shard_sync.rewritten([state["stats"]], bits=contract.STATS_ALIVE | contract.STATS_SUM_ABS_W)

    def mask(self, param: Tensor) -> Tensor:
        """``param``'s mask as a bool tensor of its shape (all True when pruning is not enabled).

        For a DTensor parameter the mask is a DTensor laid out like it (``.full_tensor()`` gathers it).
        """
        state = self.state.get(param, {})
        shard = distributed.local(param)
        if "mask_words" not in state:
            alive = torch.ones_like(shard, dtype=torch.bool)
        else:
            alive = mask_format.unpack(state["mask_words"], shard.numel(), shard.shape)
        return distributed.like(alive, param)

    def set_coefs(self, param: Tensor, **values: float) -> None:
        """Set per-tensor coefficients by name: l2, l1, sd, sd_beta, threshold, prune_count, temperature.

        All values are checked (known name, not NaN, not negative) before any is written.
        """
        label = validation.owned(self, param, "set_coefs")
        if "coefs" not in self.state.get(param, {}):
            raise ValueError(f"set_coefs({label}): pruning is not enabled for it; call enable_pruning first")
        checked = {name: validation.coefficient(name, value, label) for name, value in values.items()}
        coefs = self.state[param]["coefs"]
        for name, value in checked.items():
            coefs[getattr(contract, f"COEF_{name.upper()}")] = value
            if name in ("l2", "l1", "sd") and value != 0:
                self.regularize = True
                self.uses_sd = self.uses_sd or name == "sd"

    def schedule_pruning(self, mode: str) -> None:
        """Make the next :meth:`step` take a pruning decision of ``mode`` on every masked tensor."""
        validation.prune_mode(self, mode)
        self._pending_prune = mode

    # ------------------------------------------------------------------------------------- step
    def _backend_for(self, device: torch.device) -> str:
        name = self._backend_by_device.get(device)
        if name is None:
            name = backends.resolve(self.requested_backend, device)
            self._backend_by_device[device] = name
        return name

    @property
    def state_version(self) -> int:
        """A counter bumped whenever the parameter layout changes or state tensors are replaced (a param
        group added, pruning enabled, a state_dict loaded, a shrink): views into ``state`` stay valid
        while it and ``state`` itself stay the same."""
        return self._layout_version

    @property
    def backend(self) -> str | None:
        """The backend the last step used (``None`` before the first step)."""
        return next(iter(self._backend_by_device.values()), None)

    def _calls(self) -> tuple[list[_Call], list[Tensor | None], bytes, bool]:
        """Per group, the masked and the unmasked tensors that have gradients, with their state lists;
        every parameter's gradient (read fresh, in parameter order), their presence (one byte per
        parameter) and whether all of them passed :func:`sparsetrain.scan.grads`'s common-case checks.

        The calls are cached: rebuilt only when the parameter set (the objects themselves), the
        gradient presence or the pruning layout changes, so a steady training loop rebuilds nothing.
        """
        grads, presence, ids, plain = scan.grads([g["params"] for g in self.param_groups])
        key = (self._layout_version, ids, presence, self.uses_groups, tuple(map(self._algo_states, self.param_groups)))
        key += (torch.compiler.is_compiling(),)  # traced steps get plain lists (dynamo cannot pass TensorList)
        if key != self._calls_key:
            self._calls_cache = self._build_calls()
            self._calls_key = key
        return self._calls_cache, grads, presence, plain

    def _build_calls(self) -> list[_Call]:
        calls = []
        device = None
        index = self._param_index()
        for group_index, group in enumerate(self.param_groups):  # checked whole before any state is created
            for position, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if device is None:
                    device = p.device
                if p.device != device:
                    raise RuntimeError(
                        f"parameter {position} of param group {group_index} (shape {tuple(p.shape)}) is on {p.device} "
                        f"but earlier parameters are on {device}; one sparsetrain optimizer steps tensors of one device"
                    )
        for group_index, group in enumerate(self.param_groups):
            split: dict[bool, list[Tensor]] = {True: [], False: []}
            where: dict[bool, list[str]] = {True: [], False: []}
            for position, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                self._init_state(p, group)
                masked = "mask_words" in self.state[p]
                split[masked].append(p)
                where[masked].append(f"parameter {position} of param group {group_index}")
            for masked, params in split.items():
                if params:
                    calls.append(
                        _Call(
                            group,
                            self._owned_list()(distributed.local(p) for p in params),
                            params,
                            masked,
                            where[masked],
                            np.array([index[p] for p in params], dtype=np.int64),
                            self._static_lists(group, params, masked),
                        )
                    )
        return calls

    @staticmethod
    def _owned_list() -> type:
        """The list type of the calls' tensor lists: backends cache per list and hold these weakly."""
        return list if torch.compiler.is_compiling() else backends.TensorList

    def _static_lists(self, group: dict[str, Any], params: list[Tensor], masked: bool) -> dict[str, Any]:
        states = [self.state[p] for p in params]
        use_groups = masked and self.uses_groups
        owned = self._owned_list()
        lists = {name: owned(s[name] for s in states) for name in self._algo_states(group)}
        lists["step"] = owned(s["step"] for s in states)
        lists["pruning"] = {
            "mask_words": owned(s["mask_words"] for s in states) if masked else [],
            "stats": owned(s["stats"] for s in states) if masked else [],
            "tensor_coefs": owned(s["coefs"] for s in states) if masked else [],
            "group_coefs": owned(s["group_coefs"] for s in states) if use_groups else [],
            "group_inner": [s["group_inner"] for s in states] if use_groups else [],
            "shard_offsets": [distributed.shard_offset(p) for p in params] if self.shard_sync is not None else [],
        }
        return lists

    def _found_inf(self, grads: list[Tensor]) -> Tensor | None:
        if not self.skip_nonfinite:
            return None
        grads = [g for g in grads if g.numel()]  # the inf-norm of a 0-element tensor is undefined
        if not grads:
            return None
        maxima = torch._foreach_norm(grads, math.inf)
        return (~torch.isfinite(torch.stack(maxima))).any()

    def _seeds(self, call: _Call, prune: str) -> Tensor:
        device = call.params[0].device
        if prune != "stochastic":
            seeds = self._no_seeds.get(device)
            if seeds is None:
                seeds = self._no_seeds[device] = torch.zeros(0, dtype=torch.int64, device=device)
            return seeds
        values = philox.event_seeds(self.base_seed, call.positions, self.prune_events)
        return to_device(values, torch.int64, device)

    def nonfinite_grads(self) -> bool:
        """Whether this step's gradients hold inf/NaN, so that ``skip_nonfinite=True`` skips it.

        Always ``False`` without ``skip_nonfinite``. One host read; the device flag is kept for the
        coming :meth:`step`, which then does not compute it again.
        """
        self._found_inf_cache = None
        if not self.skip_nonfinite:
            return False
        grads = [distributed.local(p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads or any(g.is_sparse or g.device != grads[0].device for g in grads):
            return False  # step() names the problem
        self._found_inf_cache = distributed.global_flag(self, self._found_inf(grads))
        return bool(self._found_inf_cache)

    @torch.no_grad()
    def step(self, closure=None):
        """One fused step over all parameters with gradients; returns ``closure()`` if given.

        A scheduled pruning event is kept by every masked tensor, also those without a gradient now,
        and stays pending through a skipped non-finite step (:mod:`sparsetrain.optim.events`).
        Under ``torch.compile`` the step is one opaque op (:mod:`sparsetrain.optim.compiled`).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            compiled.step(self)
        else:
            self._eager_step()
        return loss

    def check_step(self) -> None:
        """Raise now what the coming :meth:`step` would refuse about this step's gradients (sparse, on two
        devices, of a dtype no backend steps), so that an attached :class:`~sparsetrain.Pruner` schedules
        nothing for a step that fails. Checks before the first step, after a refused one and after the
        parameters changed (a group added, a state loaded, a shrink); free once a step's gradients were
        accepted (gradients that change their layout later are refused by the step itself)."""
        if self._accepted_layout == self._layout_version or torch.compiler.is_compiling():
            return
        calls, _, _, plain = self._calls()
        if calls:
            self._checked_backend(calls, plain)

    def _checked_backend(self, calls: list[_Call], plain: bool) -> str:
        """The backend that steps ``calls``, once their tensors passed every check (raises naming the problem)."""
        backend = self._backend_for(calls[0].params[0].device)
        sharded = self.shard_sync is not None
        if not plain:  # plain: fp32 / bf16 / fp16 only; "auto" steps float64 with the torch reference
            backend = backends.for_dtypes(backend, self.requested_backend, [p for c in calls for p in c.params])
        if sharded or not plain:  # plain: scan.grads found every check below passed
            validation.step_tensors(calls, backend, sharded=sharded)
        return backend

    def _eager_step(self) -> None:
        events.refuse_capture(self._pending_prune)
        cached, self._found_inf_cache = self._found_inf_cache, None
        prune = self._pending_prune
        calls, every_grad, presence, plain = self._calls()
        if calls:
            self._accepted_layout = None
            backend = self._checked_backend(calls, plain)  # before any launch
            self._accepted_layout = self._layout_version
            sharded = self.shard_sync is not None
            if sharded:
                grads = [[distributed.local(p.grad) for p in call.sources] for call in calls]
            else:
                grads = [call.grads(every_grad) for call in calls]
            sd_used = self.uses_sd and self.regularize
            found_inf = cached
            if cached is None and self.skip_nonfinite:
                found_inf = self._found_inf([g for gs in grads for g in gs])
            found_inf = distributed.prepare_step(  # cached: already summed across ranks by nonfinite_grads()
                self, found_inf, prune, sd_used, flag=self.skip_nonfinite and cached is None
            )
            if prune != "none" and found_inf is not None and bool(found_inf):
                return  # a skipped step changes nothing: the event stays pending for the next step that runs
            stats_read, stats_computed = statistics.wanted(self, prune)
            written: list[Tensor] = []  # statistics vectors this step rewrites (with local sums when sharded)
            for call, call_grads in zip(calls, grads):
                lr = call.group["lr"]
                if isinstance(lr, Tensor):
                    lr_args = {"lr": 0.0, "lr_tensor": lr.reshape(()).to(call.params[0].device)}
                else:
                    lr_args = {"lr": float(lr), "lr_tensor": None}
                call_prune = prune if call.masked else "none"
                pruning = call.lists["pruning"]
                if pruning["stats"] and not stats_read:
                    pruning = {**pruning, "stats": []}  # this step neither reads nor writes statistics
                if stats_computed:
                    written += pruning["stats"]
                common = {
                    "found_inf": found_inf,
                    **lr_args,
                    **pruning,
                    "seeds": self._seeds(call, call_prune),
                    "prune": call_prune,
                    "regularize": call.masked and self.regularize,
                    "l1_proximal": self.l1_proximal,
                    "backend": backend,
                    "stats_mask": stats_computed,
                }
                if call.masked:
                    dead.rezero_written(call.params, call.versions, self.state, call.sources)
                self._launch(call, call_grads, common)
                if call.masked:
                    call.versions = dead.versions(call.params)
        if prune != "none" and 0 in presence:  # some parameter has no gradient
            events.decide_without_gradient(self, prune, statistics.wanted(self, prune)[1])
        if calls and self.shard_sync is not None and written:  # only the vectors this step rewrote hold local sums
            self.shard_sync.rewritten(written, found_inf)
        if prune == "stochastic":
            self.prune_events += 1
        self._pending_prune = "none"

    # ------------------------------------------------------------------------------- state_dict
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict plus a ``"sparsetrain"`` entry: the pruning-event counter, the base
        seed and, when a :class:`~sparsetrain.Pruner` is attached, the pruner's schedule, step count and
        history, so anything that checkpoints the optimizer resumes pruning exactly.

        Algorithm buffers of parameters that never took a step are left out, as torch.optim leaves them.
        The ``"sparsetrain"`` entry is also kept in the first parameter's state, so tools that keep only
        ``state`` and ``param_groups`` (``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``)
        keep it; with FSDP2 shards this is collective (see :func:`sparsetrain.distributed.portable_state_dict`).
        """
        sd = super().state_dict()
        for key, saved in sd["state"].items():
            if "momentum_buffer" in saved and float(saved["step"]) == 0:  # torch.optim would start it from the grad
                sd["state"][key] = {k: v for k, v in saved.items() if k != "momentum_buffer"}
        sd["sparsetrain"] = {
            "format": STATE_FORMAT,
            "optimizer": type(self).__name__,
            "base_seed": self.base_seed,
            "prune_events": self.prune_events,
            "regularize": self.regularize,
            "uses_sd": self.uses_sd,
            "uses_groups": self.uses_groups,
            "param_shapes": [tuple(p.shape) for g in self.param_groups for p in g["params"]],
        }
        if self.pruner is not None:
            sd["sparsetrain"]["pruner"] = self.pruner.schedule_state_dict()
        return distributed.portable_state_dict(self, sd)  # survives torch.distributed.checkpoint's helpers

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict saved by the same optimizer class (or by torch.optim's same algorithm).

        The whole state_dict is checked first (:func:`sparsetrain.validation.state_dict`); one that does
        not fit is refused and nothing is replaced. Tensors move to the parameter's device; statistics
        stay float64, step counts become float32, algorithm buffers take :meth:`buffer_dtype`. A
        saved pruner state goes to the attached :class:`~sparsetrain.Pruner` (or to the next one attached).
        """
        state_dict = distributed.from_portable_state_dict(self, state_dict)
        if compat.is_torch_state_dict(state_dict):
            state_dict = compat.from_torch_state_dict(self, state_dict)
            state_dict["sparsetrain"]["format"] = STATE_FORMAT
        new_groups = validation.state_dict(self, state_dict, STATE_FORMAT)
        meta = state_dict["sparsetrain"]
        if self.pruner is not None and meta.get("pruner") is not None:
            self.pruner.check_state_dict(meta["pruner"])
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip([i for g in state_dict["param_groups"] for i in g["params"]], params))
        if self.pruner is not None:  # a checkpoint saved without pruning would drop the attached Pruner's masks
            pruned = {p: k for k, p in by_id.items() if "mask_words" in state_dict["state"].get(k, {})}
            lacking = [t.name for t in self.pruner.targets if t.param not in pruned]
            if lacking:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: the state_dict has no pruning state for {lacking[0]} "
                    "(it was saved without pruning), but a Pruner is attached: load it before creating the Pruner, "
                    "which then starts pruning from it (nothing was loaded)"
                )
        buffers = self._algo_state_names()
        new_state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        for key, saved in state_dict["state"].items():
            p = by_id[key]
            for field, value in saved.items():
                if value is None:
                    continue
                if field == "step":
                    value = torch.as_tensor(value).detach().reshape(()).to(device=p.device, dtype=torch.float32)
                    new_state[p][field] = value.clone()
                elif field in buffers:
                    new_state[p][field] = value.detach().to(device=p.device, dtype=self.buffer_dtype(p), copy=True)
                elif isinstance(value, Tensor):
                    new_state[p][field] = value.detach().to(device=p.device, copy=True)
                else:
                    new_state[p][field] = copy.deepcopy(value)
        new_groups = [{**copy.deepcopy({k: v for k, v in g.items() if k != "params"}), "params": g["params"]}
                      for g in new_groups]  # fmt: skip
        self.state = new_state
        self.param_groups = new_groups
        self._layout_version += 1
        self.base_seed = int(meta["base_seed"]) & philox.MASK63
        self.prune_events = int(meta["prune_events"])
        self.regularize = meta["regularize"]
        self.uses_sd = meta.get("uses_sd", self.regularize)
        self.uses_groups = meta["uses_groups"]
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p, group)
        self._pending_prune = "none"
        self.loaded_pruner_state = meta.get("pruner")
        if self.pruner is not None and self.loaded_pruner_state is not None:
            self.pruner.load_schedule_state_dict(self.loaded_pruner_state)
            self.loaded_pruner_state = None
        distributed.loaded(self)

    def torch_group_keys(self) -> tuple[str, ...]:
        """Param-group keys that identify this algorithm in a torch.optim state_dict."""
        return ()

    def _algo_state_names(self) -> set[str]:
        return {n for g in self.param_groups for n in self._algo_states(g)}
