"""The Triton backend: host launcher of :mod:`sparsetrain.kernels.fused_step`.

One ``fused_step_kernel`` launch per pair of parameter dtype (fp32, bf16, fp16) and state dtype
(fp32 or the parameter's) present in the call, then
one ``finish_step_kernel`` launch for all tensors (preceded by one ``reduce_partials_kernel``
launch when a tensor has more than ``SEGMENT_THRESHOLD`` programs and statistics are kept). Each
statistic the step computes is a compile-time switch (``STATS_OUT``, the call's ``stats_mask``), so a
launch computes only the sums a later step reads. The
per-tensor address table and the block map are built once per set of tensors and cached; when
gradients move (a new allocation), only their row of the table is refreshed.
"""

from __future__ import annotations

import math
import os
import weakref
from collections import OrderedDict

import torch
from torch import Tensor

from .. import contract, scan
from ..transfer import to_device
from . import TensorList, stand_ins, write_back

FINISH_CHUNK = 256  # partial rows per loop iteration of a reduction program
# A tensor with more programs than this has its partials reduced first in segments of SEGMENT_ROWS
# rows, one program per segment, so that no program walks more than a few thousand rows.
SEGMENT_THRESHOLD = 4096
SEGMENT_ROWS = 2048
_PLAN_CACHE_SIZE = 16  # plans kept for plain (not optimizer-owned) lists
_LOG_BETAS_SIZE = 8
_PARAM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}  # -> tl.<name>


class LaunchConfig:
    """The main launch's shape: a block is ``words`` mask words (32 elements each), a program
    handles ``blocks`` consecutive blocks of one tensor, one block at a time, with ``num_warps`` warps.

    Defaults: 32 words (1024 elements), 8 blocks per program, and ``num_warps=0``: 4 warps for SGD,
    8 for Adam / AdamW (whose update needs more registers: at 4 warps only 2 programs fit an H100
    SM, at 8 warps 2 programs of twice the warps). A group of blocks whose mask
    words are all zero costs its program one load of those words. ``SPARSETRAIN_TRITON_WORDS``,
    ``SPARSETRAIN_TRITON_BLOCKS`` and ``SPARSETRAIN_TRITON_WARPS`` set them at import; :func:`configure`
    changes them at run time (the benchmark's sweep does). The block map of a cached plan depends on
    words and blocks, so changing them drops the cached plans.
    """

    words: int = 32
    num_warps: int = 0  # 0: by optimizer, see AUTO_WARPS
    blocks: int = 8


AUTO_WARPS = {False: 4, True: 8}  # is_adam -> warps, when LaunchConfig.num_warps is 0


def configure(
    words: int | None = None, num_warps: int | None = None, blocks: int | None = None
) -> tuple[int, int, int]:
    """Set the launch shape (powers of two: words 1..256, warps 1..16 or 0 for by-optimizer, blocks 1..64).

    Returns the shape in force afterwards as (words, num_warps, blocks).
    """
    for name, value, top in (("words", words, 256), ("num_warps", num_warps, 16), ("blocks", blocks, 64)):
        if name == "num_warps" and value == 0:
            continue
        if value is not None and (not isinstance(value, int) or value < 1 or value > top or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two between 1 and {top}, got {value!r}")
    if (words or LaunchConfig.words, blocks or LaunchConfig.blocks) != (LaunchConfig.words, LaunchConfig.blocks):
        LaunchConfig.words = words or LaunchConfig.words
        LaunchConfig.blocks = blocks or LaunchConfig.blocks
        _plans.clear()
    if num_warps is not None:
        LaunchConfig.num_warps = num_warps
    return LaunchConfig.words, LaunchConfig.num_warps, LaunchConfig.blocks


def _configure_from_env() -> None:
    for key, name in (
        ("SPARSETRAIN_TRITON_WORDS", "words"),
        ("SPARSETRAIN_TRITON_WARPS", "num_warps"),
        ("SPARSETRAIN_TRITON_BLOCKS", "blocks"),
    ):
        if os.environ.get(key):
            try:
                configure(**{name: int(os.environ[key])})
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None


def available() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not installed ({exc}); install with: pip install 'sparsetrain[triton]'"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "no CUDA device is visible (Triton runs on CPU tensors only under TRITON_INTERPRET=1)"
    return True, ""


def _kernels():
    from ..kernels import fused_step

    mirrored = (fused_step.COEF_PRUNE_COUNT, fused_step.COEF_TEMPERATURE, fused_step.STAT_TM, fused_step.NUM_PARTIALS)
    assert tuple(map(int, mirrored)) == (contract.COEF_PRUNE_COUNT, contract.COEF_TEMPERATURE, contract.STAT_TM, 4)
    bits = (fused_step.STATS_ALIVE, fused_step.STATS_SUM_ABS_W, fused_step.STATS_SUM_KERNEL, fused_step.STATS_SUM_ABS_G)
    names = ("STATS_ALIVE", "STATS_SUM_ABS_W", "STATS_SUM_KERNEL", "STATS_SUM_ABS_G")
    assert tuple(map(int, bits)) == tuple(getattr(contract, name) for name in names)
    return fused_step


class _Plan:
    """Address table, block map and partials buffer for one set of tensors."""

    def __init__(self, device: torch.device, columns: list[list[Tensor | None]], numels, inners, groups, shard, dtypes):
        fs = _kernels()
        num_tensors = len(numels)
        table = torch.zeros(int(fs.NUM_ROWS), num_tensors, dtype=torch.int64)
        addresses = [[x.data_ptr() if x is not None else 0 for x in column] for column in columns]
        for row, column in enumerate(addresses):
            table[row] = torch.tensor(column, dtype=torch.int64)
        self.grad_ptrs = addresses[int(fs.ROW_GRAD)]
        # the parameters' and gradients' addresses as scan.data_ptrs gives them (compared every step)
        self.param_key = scan.data_ptrs(columns[int(fs.ROW_PARAM)])
        self.grad_key = scan.data_ptrs(columns[int(fs.ROW_GRAD)])
        # vector accesses need a tensor's streamed data (parameter, states, gradient) 16-byte aligned,
        # decided per tensor: an unaligned one runs in a launch of its own with scalar accesses;
        # absent states have address 0
        streamed = (fs.ROW_PARAM, fs.ROW_STATE1, fs.ROW_STATE2, fs.ROW_STATE3)
        self.static_aligned = [all(addresses[int(row)][t] % 16 == 0 for row in streamed) for t in range(len(numels))]
        self.aligned = _per_tensor_alignment(self.static_aligned, self.grad_ptrs)
        table[int(fs.ROW_NUMEL)] = torch.tensor(numels, dtype=torch.int64)
        table[int(fs.ROW_INNER)] = torch.tensor(inners, dtype=torch.int64)
        table[int(fs.ROW_GROUPS)] = torch.tensor(groups, dtype=torch.int64)
        table[int(fs.ROW_SHARD_OFFSET)] = torch.tensor(shard, dtype=torch.int64)
        self.table = table.to(device)
        self.num_tensors = num_tensors
        self.words, self.blocks = LaunchConfig.words, LaunchConfig.blocks
        # blocks start on quads of the stream, and none straddles a multiple of 2**34 elements (the
        # counters i >> 2 of a block share their high word: stream_random.block_uniforms)
        block = self.words * 32
        self.quad_stream = all(
            offset % 4 == 0 and (offset % block == 0 or offset >> 34 == (offset + max(n, 1) - 1) >> 34)
            for offset, n in zip(shard, numels)
        )
        # the kernel's 32-bit group index needs 2 * max(inner, groups) + a program's span below 2**31
        span = self.blocks * self.words * 32
        self.wide_groups = 2 * max(max(inners), max(groups)) + span + 2 >= 2**31
        # one program per BLOCKS consecutive blocks of a tensor, one row of partial statistics per program
        programs = [math.ceil(max(1, math.ceil(n / (self.words * 32))) / self.blocks) for n in numels]
        first = [0] * num_tensors  # partial row of each tensor's first program
        # (((param dtype, buffer dtype), aligned), program -> tensor, program -> group index, number of programs)
        self.launches = []
        base = 0
        keys = [(dtypes[t], self.aligned[t]) for t in range(num_tensors)]
        for key in sorted(set(keys), key=str):
            block_tensor, block_local = [], []
            for t in (t for t in range(num_tensors) if keys[t] == key):
                first[t] = base
                base += programs[t]
                block_tensor += [t] * programs[t]
                block_local += list(range(programs[t]))
            self.launches.append(
                (
                    key,
                    torch.tensor(block_tensor, dtype=torch.int32, device=device),
                    torch.tensor(block_local, dtype=torch.int32, device=device),
                    len(block_tensor),
                )
            )
        self.first_row = torch.tensor(first, dtype=torch.int32, device=device)
        self.partials = torch.empty(base * int(fs.NUM_PARTIALS), dtype=torch.float64, device=device)
        self.segments = None  # (segment first rows, segment row counts, segment sums) when used
        if max(programs) > SEGMENT_THRESHOLD:
            seg_first, seg_rows, tensor_first, tensor_count = [], [], [], []
            for t in range(num_tensors):
                tensor_first.append(len(seg_first))
                starts = range(first[t], first[t] + programs[t], SEGMENT_ROWS)
                seg_first += list(starts)
                seg_rows += [min(SEGMENT_ROWS, first[t] + programs[t] - start) for start in starts]
                tensor_count.append(len(starts))
            self.segments = (
                torch.tensor(seg_first, dtype=torch.int32, device=device),
                torch.tensor(seg_rows, dtype=torch.int32, device=device),
                torch.empty(len(seg_first) * int(fs.NUM_PARTIALS), dtype=torch.float64, device=device),
            )
            first, programs = tensor_first, tensor_count
        # what the finish launch sums per tensor: rows of the partials, or of the segment sums
        self.first_partial = torch.tensor(first, dtype=torch.int32, device=device)
        self.num_partials = torch.tensor(programs, dtype=torch.int32, device=device)

    def set_grad_ptrs(self, grad_key: bytes, device: torch.device) -> bool:
        """Gradients moved (``grad_key``: their :func:`sparsetrain.scan.data_ptrs`): refresh their row of
        the address table (no host sync). False (nothing changed) when a tensor's alignment changed with
        them: its launch changes, the plan is rebuilt."""
        grad_ptrs = scan.decode(grad_key, signed=False)
        if _per_tensor_alignment(self.static_aligned, grad_ptrs) != self.aligned:
            return False
        self.table[int(_kernels().ROW_GRAD)].copy_(to_device(grad_ptrs, torch.int64, device))
        self.grad_ptrs, self.grad_key = grad_ptrs, grad_key
        return True


_plans: OrderedDict[int, _Plan] = OrderedDict()
_log_betas: OrderedDict[tuple, Tensor] = OrderedDict()
_dummies: dict[torch.device, Tensor] = {}
_configure_from_env()


def _dummy(device: torch.device) -> Tensor:
    if device not in _dummies:
        _dummies[device] = torch.zeros(2, dtype=torch.float64, device=device)
    return _dummies[device]


def _per_tensor_alignment(static_aligned: list[bool], grad_ptrs: list[int]) -> list[bool]:
    """Per tensor: its parameter, states and gradient start on 16-byte boundaries (vector accesses)."""
    return [aligned and g % 16 == 0 for aligned, g in zip(static_aligned, grad_ptrs)]


def _check(name: str, tensors: list[Tensor], device: torch.device, numels: list[int] | None = None) -> None:
    for index, x in enumerate(tensors):
        if x.device != device:
            raise RuntimeError(f"{name}[{index}] is on {x.device}, the first parameter on {device}")
        if not x.is_contiguous():
            raise RuntimeError(f"{name}[{index}] is not contiguous; the Triton backend needs contiguous tensors")
        if numels is not None and x.numel() != numels[index]:
            raise RuntimeError(f"{name}[{index}] has {x.numel()} elements, its parameter {numels[index]}")


def _state_dtypes(params: list[Tensor], state_lists) -> list[torch.dtype]:
    """Each tensor's algorithm-buffer dtype: float32 or its parameter's, the same for all its buffers."""
    dtypes = []
    for t, p in enumerate(params):
        found = {s[t].dtype for s in state_lists if s}
        if len(found) > 1 or not found <= {torch.float32, p.dtype}:
            raise RuntimeError(
                f"the buffers of params[{t}] ({p.dtype}) are {sorted(map(str, found))}; the Triton backend reads "
                "buffers of one dtype per tensor, float32 or the parameter's"
            )
        dtypes.append(found.pop() if found else torch.float32)
    return dtypes


def _plan(
    device, params, grads, state_lists, steps, mask_words, stats, coefs, group_coefs, group_inner, shard_offsets
) -> _Plan:
    """The cached plan for these tensors, or a new one (everything validated when built).

    A plan is found by the identity of the lists the optimizer keeps (it builds new lists whenever
    its parameters or state change) and checked against the parameters' addresses; only the
    gradient row of the address table is refreshed when gradients move.
    """
    static = (params, *state_lists, steps, mask_words, stats, coefs, group_coefs)
    plan = _plans.get(id(params))
    no_stats = len(state_lists) + 3  # a step without statistics keeps the plan of the steps with them
    if (
        plan is not None
        and all(_same(a, b) or (i == no_stats and not b) for i, (a, b) in enumerate(zip(plan.static, static)))
        and plan.param_key == scan.data_ptrs(params)
        and plan.layout == (list(group_inner), list(shard_offsets))
    ):
        _plans.move_to_end(id(params))
        grad_key = scan.data_ptrs(grads)
        if grad_key == plan.grad_key:
            return plan
        _check("grads", grads, device, plan.numels)
        if plan.set_grad_ptrs(grad_key, device):
            return plan
    numels = [p.numel() for p in params]
    _check("params", params, device)
    unsupported = sorted({str(p.dtype) for p in params if p.dtype not in _PARAM_DTYPES})
    if unsupported:  # refused before any launch: a mixed call must not update some dtypes only
        raise RuntimeError(f"the Triton backend supports fp32, bf16 and fp16 parameters, not {', '.join(unsupported)}")
    for name, tensors in (("grads", grads), *(("state", s) for s in state_lists)):
        _check(name, tensors, device, numels)
    state_dtypes = _state_dtypes(params, state_lists)
    num = len(params)
    pad = lambda xs: list(xs) if xs else [None] * num  # noqa: E731
    columns = [
        params,
        grads,
        *(pad(s) for s in state_lists),
        pad(mask_words),
        pad(coefs),
        pad(stats),
        pad(group_coefs),
        steps,
    ]
    assert len(columns) == int(_kernels().ROW_STEP) + 1
    inners = list(group_inner) if group_inner else [max(n, 1) for n in numels]
    groups = [gc.shape[1] for gc in group_coefs] if group_coefs else [1] * num
    shard = list(shard_offsets) if shard_offsets else [0] * num
    plan = _Plan(device, columns, numels, inners, groups, shard, list(zip([p.dtype for p in params], state_dtypes)))
    plan.numels, plan.layout = numels, (list(group_inner), list(shard_offsets))
    _remember(plan, params, static)
    return plan


def _same(record, x) -> bool:
    """Whether a plan's record of a list (the list, or a weak reference to it) is ``x``; empty lists match."""
    kept = record() if isinstance(record, weakref.ref) else record
    return kept is x or (not kept and not x)


def _remember(plan: _Plan, params, static) -> None:
    """Cache ``plan``: weakly for optimizer-owned lists (it goes with them), else in a small LRU.

    Caches never keep tensors alive: a plan holds the optimizer's lists (:class:`TensorList`)
    weakly; plans for plain lists (direct op calls) are kept for the last ``_PLAN_CACHE_SIZE``.
    """
    key = id(params)
    plan.owned = isinstance(params, TensorList)
    if plan.owned:
        plan.static = [weakref.ref(x) if isinstance(x, TensorList) else x for x in static]
        # dropped with the list (a dead list's id cannot be reused before this callback runs)
        plan.owner = weakref.ref(params, lambda _ref, key=key: _plans.pop(key, None))
    else:
        plan.static = static
    _plans[key] = plan
    _plans.move_to_end(key)
    plain = [k for k, p in _plans.items() if not p.owned]
    for k in plain[: max(0, len(plain) - _PLAN_CACHE_SIZE)]:
        del _plans[k]


def _log_beta_table(device: torch.device, beta1: float, beta2: float) -> Tensor:
    """log(beta1), log(beta2) in fp64 on ``device`` (-inf for 0), from an LRU of ``_LOG_BETAS_SIZE``
    entries: beta schedules (OneCycleLR cycles beta1 every step) do not grow it."""
    key = (device, beta1, beta2)
    table = _log_betas.get(key)
    if table is None:
        logs = [math.log(b) if b > 0 else -math.inf for b in (beta1, beta2)]
        table = _log_betas[key] = torch.tensor(logs, dtype=torch.float64, device=device)
        while len(_log_betas) > _LOG_BETAS_SIZE:
            _log_betas.popitem(last=False)
    _log_betas.move_to_end(key)
    return table


def _nm_group_size(prune: str, params, tensor_coefs, shard_offsets) -> int:
    """The group size M of an N:M decision (a compile-time constant of the kernel: one per call), 1 otherwise.

    Reads the tensors' patterns (one device-to-host copy, at N:M events only) and checks every tensor
    before any is modified.
    """
    if prune != "nm":
        return 1
    codes = torch.stack([c[contract.COEF_NM] for c in tensor_coefs]).tolist()
    sizes = set()
    for t, (param, code) in enumerate(zip(params, codes)):
        _, m = contract.nm_pattern(code)
        offset = shard_offsets[t] if shard_offsets else 0
        if offset % m or param.numel() % m:
            raise RuntimeError(
                f"prune='nm' with M={m} needs tensors (and shards) whose element count and offset are multiples of M; "
                f"tensor {t} has {param.numel()} elements at offset {offset}"
            )
        sizes.add(m)
    if len(sizes) > 1:
        raise RuntimeError(f"prune='nm' on the Triton backend takes one group size M per call, got {sorted(sizes)}")
    return sizes.pop()


def _launch(*, params, grads, **kw) -> None:
    """Stand contiguous copies in for parameters and gradients of other dense layouts, then launch."""
    params, staged = stand_ins(params)
    _launch_contiguous(params=params, grads=stand_ins(grads)[0], **kw)
    write_back(staged)


def _launch_contiguous(
    *,
    params,
    grads,
    state_lists,
    steps,
    mask_words,
    stats,
    tensor_coefs,
    group_coefs,
    group_inner,
    shard_offsets,
    seeds,
    found_inf,
    lr,
    lr_tensor,
    prune,
    regularize,
    l1_proximal,
    is_adam,
    scalars,
    flags,
    stats_mask=contract.STATS_ALL,
) -> None:
    import triton.language as tl

    fs = _kernels()
    if not params:
        return
    device = params[0].device
    if prune != "none" and not (mask_words and tensor_coefs):
        raise RuntimeError(f"prune={prune!r} needs mask_words and tensor_coefs")
    nm_m = _nm_group_size(prune, params, tensor_coefs, shard_offsets)
    if prune == "stochastic" and not stats:
        raise RuntimeError("prune='stochastic' needs stats")
    if prune == "group" and not group_coefs:
        raise RuntimeError("prune='group' needs group_coefs")
    if regularize and not tensor_coefs:
        raise RuntimeError("regularize=True needs tensor_coefs")
    stats_out = int(stats_mask) if stats else 0  # the statistics this step computes (a compile-time bit set)
    plan = _plan(
        device,
        params,
        grads,
        state_lists,
        steps,
        mask_words,
        stats,
        tensor_coefs,
        group_coefs,
        group_inner,
        shard_offsets,
    )
    dummy = _dummy(device)
    found = found_inf.to(torch.int32) if found_inf is not None else dummy
    seeds_arg = seeds if prune == "stochastic" else dummy
    lr_ptr = lr_tensor.to(torch.float32) if lr_tensor is not None else dummy
    log_betas = _log_beta_table(device, scalars["beta1"], scalars["beta2"])
    for (dtypes, aligned), block_tensor, block_local, num_programs in plan.launches:
        fs.fused_step_kernel[(num_programs,)](
            plan.table,
            plan.num_tensors,
            seeds_arg,
            block_tensor,
            block_local,
            plan.first_row,
            plan.partials,
            found,
            lr_ptr,
            lr,
            scalars["weight_decay"],
            scalars["momentum"],
            1.0 - scalars["dampening"],
            scalars["beta2"],
            1.0 - scalars["beta1"],
            1.0 - scalars["beta2"],
            scalars["eps"],
            1.0 - lr * scalars["weight_decay"],
            log_betas,
            PARAM_DTYPE=getattr(tl, _PARAM_DTYPES[dtypes[0]]),
            STATE_DTYPE=getattr(tl, _PARAM_DTYPES[dtypes[1]]),
            IS_ADAM=is_adam,
            HAS_MOMENTUM=bool(flags.get("has_momentum")),
            NESTEROV=bool(flags.get("nesterov")),
            MAXIMIZE=bool(flags["maximize"]),
            DECOUPLED=bool(flags.get("decoupled")),
            AMSGRAD=bool(flags.get("amsgrad")),
            HAS_MASK=bool(mask_words),
            HAS_STATS=bool(stats),
            STATS_OUT=stats_out,
            REGULARIZE=bool(regularize),
            L1_PROX=bool(l1_proximal),
            HAS_GROUPS=bool(group_coefs),
            PRUNE=contract.PRUNE_MODES.index(prune),
            HAS_FOUND_INF=found_inf is not None,
            LR_ON_DEVICE=lr_tensor is not None,
            ALIGNED=aligned,
            QUAD_STREAM=plan.quad_stream,
            WIDE_GROUPS=plan.wide_groups,
            WORDS=plan.words,
            BLOCKS=plan.blocks,
            NM_M=nm_m,
            num_warps=LaunchConfig.num_warps or AUTO_WARPS[bool(is_adam)],
            enable_fp_fusion=True,  # explicit: Triton 3.10 changes the default
        )
    partials = plan.partials
    if stats_out and plan.segments is not None:
        segment_first, segment_rows, partials = plan.segments
        fs.reduce_partials_kernel[(segment_first.numel(),)](
            plan.partials, partials, segment_first, segment_rows, CHUNK=FINISH_CHUNK
        )
    fs.finish_step_kernel[(plan.num_tensors,)](
        plan.table,
        plan.num_tensors,
        plan.first_partial,
        plan.num_partials,
        partials,
        found,
        STATS_OUT=stats_out,
        HAS_FOUND_INF=found_inf is not None,
        CHUNK=FINISH_CHUNK,
    )


def sgd_step(
    params,
    grads,
    momentum_buffers,
    steps,
    *,
    found_inf,
    lr,
    lr_tensor,
    weight_decay,
    momentum,
    dampening,
    nesterov,
    maximize,
    **pruning_kw,
) -> None:
    scalars = dict(weight_decay=weight_decay, momentum=momentum, dampening=dampening, beta1=0.0, beta2=0.0, eps=0.0)
    flags = dict(has_momentum=momentum != 0, nesterov=nesterov, maximize=maximize)
    _launch(
        params=params,
        grads=grads,
        state_lists=[momentum_buffers, [], []],
        steps=steps,
        found_inf=found_inf,
        lr=lr,
        lr_tensor=lr_tensor,
        is_adam=False,
        scalars=scalars,
        flags=flags,
        **pruning_kw,
    )


def adam_step(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    steps,
    *,
    found_inf,
    lr,
    lr_tensor,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled,
    amsgrad,
    maximize,
    **pruning_kw,
) -> None:
    scalars = dict(weight_decay=weight_decay, momentum=0.0, dampening=0.0, beta1=beta1, beta2=beta2, eps=eps)
    flags = dict(decoupled=decoupled, amsgrad=amsgrad, maximize=maximize)
    _launch(
        params=params,
        grads=grads,
        state_lists=[exp_avgs, exp_avg_sqs, max_exp_avg_sqs],
        steps=steps,
        found_inf=found_inf,
        lr=lr,
        lr_tensor=lr_tensor,
        is_adam=True,
        scalars=scalars,
        flags=flags,
        **pruning_kw,
    )
