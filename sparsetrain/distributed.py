"""Many ranks: DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``) with rank-independent masks.

**DDP.** Every rank holds whole tensors and steps them with the same all-reduced gradients and
the same seeds, so weights, masks, statistics and coefficients agree on every rank without any
communication from sparsetrain. ``export()`` and ``metrics()`` read local tensors only and can be
called on one rank alone (:func:`unwrap` removes the DDP wrapper before a model is copied).

**FSDP2.** Parameters are DTensors sharded on dim 0 (``Shard(0)``, torch.chunk sizes, uneven
shards and empty shards included). The optimizers keep every state tensor for the *local* shard
(plain tensors; masks packed over the shard's own elements, so a shard whose first element is not
a multiple of 32 needs nothing special) and step all local shards in one fused call whose
``shard_offsets`` are the shards' element offsets in the full tensors: the random stream and the
group indices are those of the unsharded tensor, and so are the masks.

What needs the whole tensor crosses ranks in at most ONE collective per optimizer step, only on
the steps that read it: one ``all_reduce`` of a float64 buffer (an ``all_gather`` reduced on every
rank when maxima ride along; :func:`exchange`, :class:`ShardSync`):

* per-tensor statistics (alive count, sum |w|, kernel sum, sum |g|): each step writes the local
  shard's partial sums; they are summed across ranks only before a step that reads them
  (stochastic events and the step before each, selective decay's mean |g|) and never otherwise;
* group scores (GReg picks and magnitude ratios, structured magnitude, coupled groups included):
  per-unit partial sums (maxima for the L-inf norm);
* magnitude thresholds: the coarse histograms and every rank's local values of the bins around
  its estimate (each rank in its own slots of the summed buffer), from which the exact k-th value
  is read off (:mod:`sparsetrain.selection`; a
  second round only when a rank's values lie far from its estimate), pending statistics riding
  along;
* ``metrics()`` / ``summary()``: zero, row and column counts (:func:`zero_counts`).

Checkpoints: the optimizer's ``state_dict()`` is made portable (:func:`portable_state_dict`):
its own entry also rides in the first parameter's state, per-element state and masks (packed
per row of dim 0) are DTensors, statistics are global sums. So torch.distributed.checkpoint's
standard helpers save and load it, and a checkpoint written on N ranks loads on M ranks
(:func:`save` and :func:`load` are those calls).
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import contract
from . import masks as mask_format

if TYPE_CHECKING:
    from .optim.base import FusedOptimizer

try:  # DTensor is part of every torch this package supports; guarded for minimal builds
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

# statistics that are sums over elements (summed across ranks); STAT_TM is a per-tensor scalar
SUM_STATS = (contract.STAT_ALIVE, contract.STAT_SUM_ABS_W, contract.STAT_SUM_KERNEL, contract.STAT_SUM_ABS_G)
assert SUM_STATS == tuple(range(len(SUM_STATS))), "summed statistics must lead the stats vector"


def is_sharded(t: Any) -> bool:
    """True for a DTensor (an FSDP2 parameter or gradient)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The rank's own part of ``t``: the local shard of a DTensor, ``t`` itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor gathered from every rank (collective), ``t`` itself otherwise."""
    return t.full_tensor() if is_sharded(t) else t


def shard_offset(p: Tensor) -> int:
    """Index in the flattened full tensor of the first element of ``p``'s local shard (0 if not sharded).

    Only layouts whose local shard is one contiguous range of the flattened tensor are accepted:
    a 1-D mesh with ``Shard(0)`` (FSDP2's layout) or ``Replicate()``.
    """
    if not is_sharded(p):
        return 0
    placements = p.placements
    if p.device_mesh.ndim != 1 or not isinstance(placements[0], (Shard, Replicate)):
        raise NotImplementedError(
            f"sparsetrain steps DTensors on a 1-D mesh with Shard(0) or Replicate() (FSDP2), got mesh of "
            f"{p.device_mesh.ndim} dims and placements {placements}"
        )
    if isinstance(placements[0], Replicate):
        return 0
    if placements[0].dim != 0:
        raise NotImplementedError(f"sparsetrain steps DTensors sharded on dim 0 only, got {placements[0]}")
    rows_before = _row_offset(p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank())
    return rows_before * (math.prod(p.shape[1:]) if p.dim() > 1 else 1)


def _row_offset(rows: int, world: int, rank: int) -> int:
    """First row of ``rank``'s chunk under ``torch.chunk`` sizes (what ``Shard(0)`` uses)."""
    per_rank = -(-rows // world) if rows else 0
    return min(per_rank * rank, rows)


def group_of(params: list[Tensor]) -> dist.ProcessGroup | None:
    """The process group of the DTensors among ``params`` (None when none is sharded)."""
    groups = {}
    for p in params:
        if is_sharded(p):
            group = p.device_mesh.get_group()
            groups[group.group_name] = group
    if not groups:
        return None
    if len(groups) > 1:
        raise NotImplementedError("sparsetrain optimizers step DTensors of one process group only")
    return next(iter(groups.values()))


def exchange(sums: list[Tensor], group: dist.ProcessGroup | None, *, maxes: list[Tensor] = ()) -> None:
    """ONE collective: sum ``sums`` (or take the maximum of ``maxes``) across ranks, in place.

    Everything travels as float64 in one buffer (exact for integers below 2**53): an
    ``all_reduce`` for sums; with ``maxes``, an ``all_gather`` reduced on every rank in rank order
    (sums and maxima in the same round). Every rank gets the very same bits. Nothing is
    communicated for a group of one rank (or when there is nothing to exchange).
    """
    maxes = list(maxes)
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1 or not (sums or maxes):
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in (*sums, *maxes)])
    if not maxes:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        rows = None
    else:
        table = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(table, flat, group=group)
        rows = torch.stack(table)
    start = 0
    for t in sums:
        n = t.numel()
        if rows is None:
            total = flat[start : start + n]
        else:
            total = rows[0, start : start + n].clone()
            for other in rows[1:, start : start + n]:  # rank order: identical sums on every rank
                total += other
        t.copy_(total.view(t.shape).to(t.dtype))
        start += n
    for t in maxes:
        n = t.numel()
        t.copy_(rows[:, start : start + n].amax(dim=0).view(t.shape).to(t.dtype))
        start += n


class ShardSync:
    """Cross-rank bookkeeping of one optimizer whose parameters include DTensor shards.

    Statistics are tracked per tensor and per statistic: what was rewritten locally (a fused step
    that computed statistics: the whole vector; ``enable_pruning``; ``set_mask``: the alive count and
    sum |w|) holds this rank's partial sums (:meth:`rewritten`); the rest holds what it held.
    :meth:`request_stats` has the partial ones summed at the next round of communication, which is
    either the one round of a selection or of a group score, or :meth:`flush` (called before the
    fused step and before a method reads statistics); what is already global is never summed
    again. Every round is ONE collective (:func:`exchange`); :attr:`collectives` counts them.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.collectives = 0
        # statistics vectors holding some of this rank's partial sums, by id: (vector, contract.STATS_* bits)
        self._partial: dict[int, tuple[Tensor, int]] = {}
        self._requested = False

    @property
    def stats_global(self) -> bool:
        """True when no statistics vector holds partial sums (all summed across ranks)."""
        return not self._partial

    def request_stats(self) -> None:
        """Have the statistics that hold partial sums (those :meth:`rewritten` marked) summed across ranks at
        the next round or :meth:`flush` (those rewritten in between included), before they are next read."""
        self._requested = True

    def reduce(self, tensors: list[Tensor], *, maxes: list[Tensor] = ()) -> None:
        """Sum ``tensors`` (and any requested statistics) and take the maximum of ``maxes`` across
        ranks, all in one collective (see :func:`exchange`)."""
        pending = []
        if self._requested:
            pending = [run for s, bits in self._partial.values() for run in _runs(s, bits)]
            self._partial, self._requested = {}, False
        if self.world_size > 1:
            self.collectives += 1
        exchange(pending + list(tensors), self.group, maxes=maxes)

    def flush(self) -> None:
        """Run the requested statistics reduction now (no collective when nothing requested holds partial sums)."""
        if self._requested and self._partial:
            self.reduce([])
        self._requested = False

    def rewritten(self, stats: list[Tensor], skipped: Tensor | None = None, *, bits: int = contract.STATS_ALL) -> None:
        """The statistics ``bits`` (``contract.STATS_*``) of the vectors ``stats`` were rewritten with
        local partial sums (a fused step: all of them; a mask change: alive count and sum |w|); the
        other statistics, and the other tensors', keep what they hold (global values stay global).

        ``skipped``: the step's inf/NaN flag; a skipped step wrote nothing (one host read, only with
        ``skip_nonfinite``).
        """
        if skipped is not None and bool(skipped):
            return
        for s in stats:
            self._partial[id(s)] = (s, self._partial.get(id(s), (s, 0))[1] | bits)

    def summed(self) -> None:
        """Every statistics vector holds global values (a loaded checkpoint saved them summed)."""
        self._partial, self._requested = {}, False


def _runs(stats: Tensor, bits: int) -> list[Tensor]:
    """Views of ``stats`` over the consecutive summed statistics whose bits are set."""
    runs, start = [], None
    for i in (*SUM_STATS, len(SUM_STATS)):
        on = i < len(SUM_STATS) and bool(bits >> i & 1)
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append(stats[start:i])
            start = None
    return runs


def sync_of(optimizer: Any) -> ShardSync | None:
    """The optimizer's :class:`ShardSync` (None when none of its parameters is sharded)."""
    return getattr(optimizer, "shard_sync", None)


def attach(optimizer: FusedOptimizer, params: list[Tensor]) -> None:
    """Give ``optimizer`` a :class:`ShardSync` if ``params`` holds DTensors (called per param group)."""
    group = group_of(params)
    if group is None:
        return
    sync = sync_of(optimizer)
    if sync is None:
        optimizer.shard_sync = ShardSync(group)
    elif sync.group.group_name != group.group_name:
        raise NotImplementedError("sparsetrain optimizers step DTensors of one process group only")
    for p in params:
        shard_offset(p)  # rejects layouts other than FSDP2's before anything is stepped


def prepare_step(
    optimizer: FusedOptimizer, found_inf: Tensor | None, prune: str, sd_used: bool, *, flag: bool
) -> Tensor | None:
    """Before a fused step on shards: sum the statistics it reads (stochastic events, selective
    decay) and, when ``flag`` (``skip_nonfinite`` and the flag not yet global), the inf/NaN flag
    (any rank's skips the step everywhere), all in one collective; returns the flag for the op."""
    sync = sync_of(optimizer)
    if sync is None:
        return found_inf
    if prune == "stochastic" or sd_used:
        sync.request_stats()
    if not flag:
        sync.flush()
        return found_inf
    return global_flag(optimizer, found_inf)


def global_flag(optimizer: FusedOptimizer, flag: Tensor | None) -> Tensor | None:
    """``flag`` (inf/NaN seen) set on every rank when set on any, with pending statistics in the same collective."""
    sync = sync_of(optimizer)
    if sync is None:
        return flag
    value = torch.zeros(1, dtype=torch.float64) if flag is None else flag.to(torch.float64).reshape(1)
    sync.reduce([value])
    return value[0] > 0


def local_part(value: Tensor, param: Tensor) -> Tensor:
    """``value`` (shaped like ``param``) restricted to ``param``'s local shard.

    A DTensor gives its local tensor; a plain tensor of the full shape gives the rows of the
    local shard (``param`` itself when ``param`` is not sharded).
    """
    if is_sharded(value):
        return value.to_local()
    if not is_sharded(param):
        return value
    rows = local(param).shape[0] if param.dim() else 1
    first = _row_offset(param.shape[0], param.device_mesh.size(), param.device_mesh.get_local_rank())
    return value[first : first + rows] if isinstance(param.placements[0], Shard) else value


def like(value: Tensor, param: Tensor) -> Tensor:
    """A local tensor shaped like ``param``'s shard, as a DTensor laid out like ``param`` (as is otherwise)."""
    if not is_sharded(param):
        return value
    return DTensor.from_local(
        value, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


def zero_counts(zeros: list[Tensor], params: list[Tensor]) -> list[dict[str, int]]:
    """Per tensor, over the FULL tensor: zeros, all-zero rows (dim 0) and all-zero columns (dim 1).

    ``zeros``: bool tensors of the local shards (of ``params``, laid out like them). With DTensor
    shards this is ONE collective (every rank calls it); otherwise local. Returns dicts with
    ``zeros``, ``numel``, ``rows``, ``dead_rows``, ``cols`` and ``dead_cols`` (``cols`` 0 for a
    1-D tensor).
    """
    sums, columns = [], []
    for z, p in zip(zeros, params):
        rows_local = z.reshape(z.shape[0], math.prod(z.shape[1:])) if z.dim() >= 1 else z.reshape(1, 1)
        sums.append(torch.stack([z.sum(), rows_local.all(dim=1).sum()]).to(torch.float64))
        if p.dim() >= 2:  # explicit sizes: an FSDP2 shard may have no rows
            alive = (~z).transpose(0, 1)
            columns.append(alive.reshape(alive.shape[0], math.prod(alive.shape[1:])).sum(dim=1).to(torch.float64))
        else:
            columns.append(torch.zeros(0, dtype=torch.float64, device=z.device))
    group = group_of(params)
    if group is not None:
        exchange(sums + columns, group)
    out = []
    for scalars, alive_cols, p in zip(sums, columns, params):
        zeros_, dead_rows = (int(v) for v in scalars.tolist())
        out.append(
            {
                "zeros": zeros_,
                "numel": p.numel(),
                "rows": p.shape[0] if p.dim() else 1,
                "dead_rows": dead_rows,
                "cols": p.shape[1] if p.dim() >= 2 else 0,
                "dead_cols": int((alive_cols == 0).sum()),
            }
        )
    return out


# ------------------------------------------------------------------------ checkpoints (DCP)
def _pack_rows(alive: Tensor) -> Tensor:
    """Bool ``[rows, n]`` -> int32 ``[rows, ceil(n / 32)]``, each row packed like :mod:`sparsetrain.masks`."""
    rows = alive.shape[0]
    words = mask_format.num_words(alive.shape[1]) if alive.dim() > 1 else 1
    if rows == 0:
        return torch.zeros(0, words, dtype=torch.int32, device=alive.device)
    return torch.stack([mask_format.pack(row) for row in alive.reshape(rows, -1)])


def _unpack_rows(words: Tensor, row_numel: int) -> Tensor:
    """Inverse of :func:`_pack_rows`: int32 ``[rows, W]`` -> bool ``[rows, row_numel]``."""
    if words.shape[0] == 0:
        return torch.zeros(0, row_numel, dtype=torch.bool, device=words.device)
    return torch.stack([mask_format.unpack(row, row_numel) for row in words])


def _as_dtensor(value: Tensor, like: Tensor, shape: tuple[int, ...]) -> Tensor:
    return DTensor.from_local(
        value,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=_contiguous_stride(shape),
    )


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


META_KEY = "sparsetrain"  # the per-parameter state entry that carries the optimizer's own state


def portable_state_dict(optimizer: FusedOptimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """Make ``sd`` (the optimizer's state_dict) survive ``torch.distributed.checkpoint``'s helpers.

    * The ``"sparsetrain"`` entry (base seed, event counter, the pruner's schedule, step count and
      history) is also kept, serialized, in the first parameter's state under ``"sparsetrain"``:
      ``get_optimizer_state_dict`` keeps per-parameter entries and drops other top-level keys.
    * FSDP2 shards (collective: every rank calls it): statistics are summed across ranks first, so
      every rank saves the global values; per-element buffers (momentum, moments) are DTensors laid
      out like their parameter, and masks are ``"mask_rows"``: int32 ``[rows, words]`` DTensors
      packed per row of dim 0, so a checkpoint written on N ranks loads on M ranks.
    """
    sync = sync_of(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if sync is not None:
        sync.request_stats()
        sync.flush()
        per_element = optimizer._algo_state_names()
        for index, p in enumerate(params):
            saved, live = sd["state"].get(index), optimizer.state.get(p, {})
            if saved is None or not is_sharded(p):
                continue
            saved = sd["state"][index] = dict(saved)  # torch's state_dict hands out the live entries
            for field in sorted(per_element & live.keys()):  # from the live state: also buffers not used yet
                saved[field] = _as_dtensor(live[field], p, tuple(p.shape))
            if "mask_words" in saved:
                row_numel = math.prod(p.shape[1:]) if p.dim() > 1 else 1
                alive = mask_format.unpack(saved.pop("mask_words"), local(p).numel()).reshape(-1, row_numel)
                words = _pack_rows(alive)
                saved["mask_rows"] = _as_dtensor(words, p, (p.shape[0], words.shape[1]))
    if sd["state"]:
        buffer = io.BytesIO()
        torch.save(sd[META_KEY], buffer)
        first = next(iter(sd["state"]))
        sd["state"][first] = {**sd["state"][first], META_KEY: buffer.getvalue()}
    return sd


def _decode_meta(blob: Any) -> Any:
    """The ``"sparsetrain"`` entry as :func:`portable_state_dict` carries it in a parameter's state."""
    return torch.load(io.BytesIO(blob), weights_only=True) if isinstance(blob, bytes) else blob


def carried_meta(sd: Any) -> dict[str, Any] | None:
    """The ``"sparsetrain"`` entry of an optimizer state_dict: top level, or carried in a parameter's
    state (a dict that went through ``torch.distributed.checkpoint``'s helpers); ``None`` if absent."""
    if not isinstance(sd, dict):
        return None
    if isinstance(sd.get(META_KEY), dict):
        return sd[META_KEY]
    state = sd.get("state")
    for saved in state.values() if isinstance(state, dict) else ():
        blob = saved.get(META_KEY) if isinstance(saved, dict) else None
        if blob is not None:
            return _decode_meta(blob)
    return None


def from_portable_state_dict(optimizer: FusedOptimizer, sd: Any) -> Any:
    """Undo :func:`portable_state_dict` (also on a dict that lost its top-level ``"sparsetrain"``
    entry, as ``torch.distributed.checkpoint.state_dict.set_optimizer_state_dict`` passes it):
    DTensor values become the local shards of this run's layout. Anything else is returned as is."""
    state = sd.get("state") if isinstance(sd, dict) else None
    if not isinstance(state, dict):
        return sd
    portable = [k for k, v in state.items() if isinstance(v, dict) and (META_KEY in v or "mask_rows" in v)]
    portable += [k for k, v in state.items() if isinstance(v, dict) and any(is_sharded(x) for x in v.values())]
    if not portable:
        return sd
    params = [p for g in optimizer.param_groups for p in g["params"]]
    groups = sd.get("param_groups")
    keys = [k for g in groups for k in g.get("params", ())] if isinstance(groups, list) else []
    by_key = dict(zip(keys, params))
    meta, new_state = None, {}
    for key, saved in state.items():
        if key not in portable:
            new_state[key] = saved
            continue
        saved = dict(saved)
        blob = saved.pop(META_KEY, None)
        if blob is not None and meta is None:
            meta = _decode_meta(blob)
        for field, value in list(saved.items()):
            if is_sharded(value):
                saved[field] = value.to_local()
        rows = saved.pop("mask_rows", None)
        p = by_key.get(key)
        if rows is not None and p is not None:
            row_numel = math.prod(p.shape[1:]) if p.dim() > 1 else 1
            alive = _unpack_rows(rows, row_numel).reshape(-1)[: local(p).numel()]
            saved["mask_words"] = mask_format.pack(alive)
        new_state[key] = saved
    out = dict(sd)
    out["state"] = new_state
    if META_KEY not in out and meta is not None:
        out[META_KEY] = meta
    return out


def loaded(optimizer: FusedOptimizer) -> None:
    """After a load: saved statistics are global sums (a sharded save summed them first)."""
    sync = sync_of(optimizer)
    if sync is not None:
        sync.summed()


def save(checkpoint_id: str, model: nn.Module, optimizer: FusedOptimizer) -> None:
    """Save model and optimizer (masks, statistics, coefficients, the attached pruner's schedule) with
    torch.distributed.checkpoint's standard helpers: ``get_state_dict`` then ``dcp.save``.

    Collective over the ranks that hold the shards (every rank calls it). The checkpoint can be
    loaded on any number of ranks, one included. Nothing here is needed for that: the same two
    calls written out by hand (README, many ranks) save and load the same checkpoint.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint_id, process_group=_group(optimizer))


def load(checkpoint_id: str, model: nn.Module, optimizer: FusedOptimizer) -> None:
    """Load a checkpoint written by :func:`save`, on this run's ranks and sharding; collective.

    Build the model, wrap it the same way (``fully_shard`` or not), create the optimizer and the
    pruner exactly as for a fresh run, then call this (``get_state_dict``, ``dcp.load``,
    ``set_state_dict``).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=checkpoint_id, process_group=_group(optimizer))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _group(optimizer: FusedOptimizer) -> dist.ProcessGroup | None:
    """The ranks that hold the optimizer's shards (None: the default group, or one process)."""
    sync = sync_of(optimizer)
    return sync.group if sync is not None else None


# ------------------------------------------------------------------------ models
def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (``model`` itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def has_sharded_params(model: nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())
