"""The op contract: one in-place fused-step op per optimizer family, registered with torch.library.

``sparsetrain::sgd_step_`` and ``sparsetrain::adam_step_`` (Adam and AdamW, ``decoupled``) update
lists of tensors in place, all in one call: regularization gradient, optimizer update, pruning
decision, mask application and next-step statistics. The layouts of ``tensor_coefs``,
``group_coefs``, ``stats`` and ``mask_words`` are documented in :mod:`sparsetrain.contract`.
``backend`` names the implementation (:mod:`sparsetrain.backends`); every backend computes the
same function. The ops have fake implementations, so ``torch.compile(fullgraph=True)`` keeps them
in the graph.

``shard_offsets[t]`` is the index of the tensor's first element in the full, unsharded tensor: the
random stream and the group index use global indices, so masks do not depend on sharding (empty
list = all 0).

Empty lists switch features off: no ``mask_words`` = no masks; no ``stats`` = no statistics; no
``group_coefs`` = no per-group lam. Statistics are computed per statistic, only those a later step
reads: ``stats_mask`` names them (bits ``contract.STATS_*``, default all); a call computes them and
overwrites the whole ``stats`` vector, the statistics it does not compute with 0 (``STAT_TM`` with
``STAT_SUM_KERNEL``). With ``write_stats=False`` (or ``stats_mask=0``) it computes none: the previous
step's statistics are read and left as they are. ``write_stats=True`` without ``stats_mask`` keeps
the old all-statistics behaviour. ``steps`` are incremented by the op. When ``found_inf`` is given
and nonzero, nothing at all is modified.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends, contract

_PRUNING_MUTATES = ("mask_words", "stats")


@torch.library.custom_op(
    "sparsetrain::sgd_step_", mutates_args=("params", "momentum_buffers", "steps", *_PRUNING_MUTATES)
)
def sgd_step_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    steps: list[Tensor],
    mask_words: list[Tensor],
    stats: list[Tensor],
    tensor_coefs: list[Tensor],
    group_coefs: list[Tensor],
    group_inner: list[int],
    shard_offsets: list[int],
    seeds: Tensor,
    found_inf: Tensor | None,
    lr: float,
    lr_tensor: Tensor | None,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    prune: str,
    regularize: bool,
    l1_proximal: bool,
    backend: str,
    write_stats: bool = True,
    stats_mask: int = contract.STATS_ALL,
) -> None:
    """Fused SGD (``torch.optim.SGD`` semantics) with regularization, pruning and masks, in place.

    All lists have one entry per tensor, in the same order. Tensors of one call share a device;
    parameters and gradients are float32, bfloat16 or float16 (contiguous or not), states float32.

    Args:
        params: the parameters, updated in place.
        grads: their gradients (same shapes), read only.
        momentum_buffers: float32 buffers of the parameters' shapes, updated in place (empty when
            ``momentum == 0``).
        steps: float32 scalar tensors, the per-tensor step counts, incremented in place.
        mask_words: per tensor, int32 ``[ceil(numel / 32)]``, the packed mask (bit ``i % 32`` of word
            ``i // 32``, 1 = alive); updated in place at pruning events. Empty: no masks.
        stats: per tensor, float64 ``[NUM_STATS]``; read (previous step) and, when this step
            computes statistics (``write_stats``, ``stats_mask``), overwritten (this step). Empty: no
            statistics.
        tensor_coefs: per tensor, float32 ``[NUM_COEFS]`` (``l2``, ``l1``, ``sd``, ``sd_beta``,
            ``threshold``, ``prune_count``, ``temperature``; see :mod:`sparsetrain.contract`).
        group_coefs: per tensor, float32 ``[2, G]``: per-group ``lam`` and prune flags. Empty: none.
        group_inner: per tensor, ``inner`` of the group index ``(i // inner) % G``.
        shard_offsets: per tensor, the index of its first element in the full, unsharded tensor
            (random stream and group index use global indices). Empty: all 0.
        seeds: int64 ``[len(params)]``, the per-tensor seeds of a ``"stochastic"`` event (empty
            otherwise).
        found_inf: optional bool/float scalar tensor; when nonzero nothing at all is modified.
        lr: learning rate (used when ``lr_tensor`` is ``None``).
        lr_tensor: optional 0-dim float32 tensor on the device holding the learning rate.
        weight_decay: coupled weight decay.
        momentum: momentum factor.
        dampening: dampening of the momentum.
        nesterov: Nesterov momentum.
        maximize: maximize instead of minimize.
        prune: ``"none"``, ``"stochastic"``, ``"low"``, ``"high"``, ``"group"`` or ``"nm"``: the decision
            taken on the updated weights of every masked tensor of the call.
        regularize: apply the per-tensor ``l2`` / ``l1`` / selective-decay coefficients.
        l1_proximal: L1 as a soft-threshold after the update (``True``) or a subgradient.
        backend: ``"torch"``, ``"triton"`` or ``"native"`` (a resolved name, not ``"auto"``).
        write_stats: compute this step's statistics (those of ``stats_mask``) and store them over
            ``stats``; ``False``: compute none, only read the previous ones (selective decay,
            sampling) and leave them as they are.
        stats_mask: which statistics a writing step computes: bits ``contract.STATS_ALIVE``,
            ``STATS_SUM_ABS_W``, ``STATS_SUM_KERNEL`` (with ``STAT_TM``), ``STATS_SUM_ABS_G``; the
            others are stored as 0. Default ``contract.STATS_ALL``; 0 computes none.
    """
    backends.module(backend).sgd_step(
        params,
        grads,
        momentum_buffers,
        steps,
        mask_words=mask_words,
        stats=stats,
        tensor_coefs=tensor_coefs,
        group_coefs=group_coefs,
        group_inner=group_inner,
        shard_offsets=shard_offsets,
        seeds=seeds,
        found_inf=found_inf,
        lr=lr,
        lr_tensor=lr_tensor,
        weight_decay=weight_decay,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        prune=prune,
        regularize=regularize,
        l1_proximal=l1_proximal,
        stats_mask=contract.stats_computed(write_stats, stats_mask),
    )


@sgd_step_.register_fake
def _(*args, **kwargs) -> None:
    return None


@torch.library.custom_op(
    "sparsetrain::adam_step_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps", *_PRUNING_MUTATES),
)
def adam_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    mask_words: list[Tensor],
    stats: list[Tensor],
    tensor_coefs: list[Tensor],
    group_coefs: list[Tensor],
    group_inner: list[int],
    shard_offsets: list[int],
    seeds: Tensor,
    found_inf: Tensor | None,
    lr: float,
    lr_tensor: Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    amsgrad: bool,
    maximize: bool,
    prune: str,
    regularize: bool,
    l1_proximal: bool,
    backend: str,
    write_stats: bool = True,
    stats_mask: int = contract.STATS_ALL,
) -> None:
    """Fused Adam (``decoupled=False``) or AdamW step with regularization, pruning and masks, in place.

    All lists have one entry per tensor, in the same order. Tensors of one call share a device;
    parameters and gradients are float32, bfloat16 or float16, moments float32.

    Args:
        params: the parameters, updated in place.
        grads: their gradients (same shapes), read only.
        exp_avgs: float32 first moments of the parameters' shapes, updated in place.
        exp_avg_sqs: float32 second moments, updated in place.
        max_exp_avg_sqs: float32 running maxima of the second moments (``amsgrad``; empty otherwise).
        steps: float32 scalar tensors, the per-tensor step counts (bias correction), incremented in
            place.
        mask_words: per tensor, int32 ``[ceil(numel / 32)]``, the packed mask (bit ``i % 32`` of word
            ``i // 32``, 1 = alive); updated in place at pruning events. Empty: no masks.
        stats: per tensor, float64 ``[NUM_STATS]``; read (previous step) and, when this step
            computes statistics (``write_stats``, ``stats_mask``), overwritten (this step). Empty: no
            statistics.
        tensor_coefs: per tensor, float32 ``[NUM_COEFS]`` (``l2``, ``l1``, ``sd``, ``sd_beta``,
            ``threshold``, ``prune_count``, ``temperature``; see :mod:`sparsetrain.contract`).
        group_coefs: per tensor, float32 ``[2, G]``: per-group ``lam`` and prune flags. Empty: none.
        group_inner: per tensor, ``inner`` of the group index ``(i // inner) % G``.
        shard_offsets: per tensor, the index of its first element in the full, unsharded tensor
            (random stream and group index use global indices). Empty: all 0.
        seeds: int64 ``[len(params)]``, the per-tensor seeds of a ``"stochastic"`` event (empty
            otherwise).
        found_inf: optional bool/float scalar tensor; when nonzero nothing at all is modified.
        lr: learning rate (used when ``lr_tensor`` is ``None``).
        lr_tensor: optional 0-dim float32 tensor on the device holding the learning rate.
        beta1: first-moment coefficient.
        beta2: second-moment coefficient.
        eps: term added to the denominator.
        weight_decay: weight decay, coupled (Adam) or decoupled (AdamW).
        decoupled: AdamW's decoupled weight decay.
        amsgrad: the AMSGrad variant.
        maximize: maximize instead of minimize.
        prune: ``"none"``, ``"stochastic"``, ``"low"``, ``"high"``, ``"group"`` or ``"nm"``: the decision
            taken on the updated weights of every masked tensor of the call.
        regularize: apply the per-tensor ``l2`` / ``l1`` / selective-decay coefficients.
        l1_proximal: L1 as a soft-threshold after the update (``True``) or a subgradient.
        backend: ``"torch"``, ``"triton"`` or ``"native"`` (a resolved name, not ``"auto"``).
        write_stats: compute this step's statistics (those of ``stats_mask``) and store them over
            ``stats``; ``False``: compute none, only read the previous ones (selective decay,
            sampling) and leave them as they are.
        stats_mask: which statistics a writing step computes: bits ``contract.STATS_ALIVE``,
            ``STATS_SUM_ABS_W``, ``STATS_SUM_KERNEL`` (with ``STAT_TM``), ``STATS_SUM_ABS_G``; the
            others are stored as 0. Default ``contract.STATS_ALL``; 0 computes none.
    """
    backends.module(backend).adam_step(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        mask_words=mask_words,
        stats=stats,
        tensor_coefs=tensor_coefs,
        group_coefs=group_coefs,
        group_inner=group_inner,
        shard_offsets=shard_offsets,
        seeds=seeds,
        found_inf=found_inf,
        lr=lr,
        lr_tensor=lr_tensor,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        decoupled=decoupled,
        amsgrad=amsgrad,
        maximize=maximize,
        prune=prune,
        regularize=regularize,
        l1_proximal=l1_proximal,
        stats_mask=contract.stats_computed(write_stats, stats_mask),
    )


@adam_step_.register_fake
def _(*args, **kwargs) -> None:
    return None


def call(op, *args, **kwargs) -> None:
    """Run ``op`` (``sgd_step_`` or ``adam_step_``) the way the optimizers do.

    Under ``torch.compile`` the registered op is called, so it is traced as one node. In eager mode
    the same implementation is called directly: on long tensor lists the dispatcher's per-tensor
    Python bookkeeping (version counters of every mutated tensor) costs more than the kernel itself.
    """
    if torch.compiler.is_compiling():
        op(*args, **kwargs)
    else:
        op._init_fn(*args, **kwargs)
