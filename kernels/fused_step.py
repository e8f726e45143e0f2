"""The fused pruning step: one pass over memory for every tensor of an optimizer call.

Per element (docs/design.md, "The fused step: per-element contract"), with w, g in the parameter dtype and math in fp32:

    a = mask bit; a dead element does not take part (its values, zero already, stay as they are)
    r = lam[j]*w + l2*w + sd*w*max(0, 1 - |g|/(beta*gbar)) [+ l1*sign(w) unless proximal]
    SGD : g' = g + wd*w + r; buf = g' (first step) or momentum*buf + (1-dampening)*g';
          w -= lr * (g' + momentum*buf if nesterov else buf)
    Adam: g' = g [+ wd*w unless decoupled] + r; w *= 1 - lr*wd if decoupled; m = lerp(m, g', 1-b1);
          v = b2*v + (1-b2)*g'^2; vmax = max(vmax, v); w -= lr/bc1 * m / (sqrt(v or vmax)/sqrt(bc2) + eps)
    proximal L1: w = sign(w) * max(|w| - lr*l1, 0)
    decision on the updated w at pruning events: stochastic u < q(|w|) with u = tl.rand4x(seed_t, i >> 2)
    [i & 3], i the element's index in its (unsharded) tensor; |w| < t; |w| > t; group j flagged
    write w*a', states*a', mask words (event steps only); per-program partial statistics in fp64

Bytes per element, fp32 SGD with momentum: read w, g, buf (12) + mask bit; write w, buf (8) + bit:
20.25 B. A program handles a group of consecutive blocks of one tensor, one block at a time; a
group whose mask words are all zero reads nothing but its mask words and writes one zero row of
partials (a dead group of 8 x 1024 elements costs its program one load), and a dead block inside a
live group is skipped. Statistics are summed per thread in fp64 over the program's blocks and
reduced across the program once, into one row of partials per program.
Inside a live block wholly inside its tensor and more than 1/8 live, every element is streamed
through unmasked 16-byte vector loads and stores (a dead element is written back as it was read:
DRAM moves 32-byte sectors anyway). A sparser block, and the tail block, use accesses predicated
on the live elements, so only the sectors holding live elements move.
A second, tiny launch reduces the per-program partials per tensor in a fixed order (deterministic)
and advances the step counters. When a tensor has many programs (a 268M tensor has 32768), a
launch before it reduces fixed segments of the partials in parallel (``reduce_partials_kernel``),
so that no single program walks megabytes of partials serially; the order stays fixed.
Runtime values (lr, coefficients, seeds, steps) are arguments or live in device memory; only
structural switches are ``tl.constexpr``. QUAD_STREAM (every shard offset a multiple of 4, so every
block starts on a quad of the random stream, and no block straddles a multiple of 2**34 elements)
lets a block draw its uniforms with one Philox call per four elements; without it each element
makes its own call (same values). WIDE_GROUPS (a group run or a group count too large for the
32-bit group index, see _div_small) computes j(i) in 64 bits. Statistics: HAS_STATS, the call has
statistics tensors, whose previous values selective decay and stochastic sampling read; STATS_OUT,
the bit set (STATS_* below, sparsetrain.contract) of the statistics this step computes and stores
over those, each sum a switch of its own: a sum no later step reads is not computed at all (no
conversion, add or reduction), and is stored as 0; with STATS_OUT = 0 the step computes none (an
event that only reads them costs what a step without them costs).
Instruction count (tests/issue_time.py reads it from the compiled code): inside a block nothing
branches on a decision or a random number, so the elements' alive and keep predicates are never
held across a branch (ptxas would park them in general registers, a few instructions each). A
dead element's values go through the arithmetic and are discarded by the selects of the stores;
a stochastic event draws the random numbers of every live block (a tensor that samples none has
q = 0); the kernel statistic's terms are computed on every step that computes the kernel sum
(dropped at the end of the program when no scale exists).

Dtypes: parameters and gradients fp32 / bf16 / fp16, optimizer states fp32 or the parameter's dtype
(one launch per pair present; math in fp32, states rounded once when stored), statistics fp64,
masks int32. Offsets are int64 throughout.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .stream_random import UNIFORM_SCALE, block_uniforms, element_uniforms, philox_keys
from .streaming import block_elements, load_block_f32, store_block, unpack_live

# Module-level values a kernel reads must be tl.constexpr; the host reads them with int(...).
# Rows of the int64 per-tensor table (addresses and sizes), one column per tensor.
ROW_PARAM = tl.constexpr(0)
ROW_GRAD = tl.constexpr(1)
ROW_STATE1 = tl.constexpr(2)
ROW_STATE2 = tl.constexpr(3)
ROW_STATE3 = tl.constexpr(4)
ROW_MASK = tl.constexpr(5)
ROW_COEF = tl.constexpr(6)
ROW_STATS = tl.constexpr(7)
ROW_GROUP = tl.constexpr(8)
ROW_STEP = tl.constexpr(9)
ROW_NUMEL = tl.constexpr(10)
ROW_INNER = tl.constexpr(11)
ROW_GROUPS = tl.constexpr(12)
ROW_SHARD_OFFSET = tl.constexpr(13)
NUM_ROWS = tl.constexpr(14)
# Prune-mode switch values: positions in sparsetrain.contract.PRUNE_MODES.
PRUNE_NONE = tl.constexpr(0)
PRUNE_STOCHASTIC = tl.constexpr(1)
PRUNE_LOW = tl.constexpr(2)
PRUNE_HIGH = tl.constexpr(3)
PRUNE_GROUP = tl.constexpr(4)
PRUNE_NM = tl.constexpr(5)
# Layout constants mirrored from sparsetrain.contract (checked equal by the host launcher).
COEF_L2 = tl.constexpr(0)
COEF_L1 = tl.constexpr(1)
COEF_SD = tl.constexpr(2)
COEF_SD_BETA = tl.constexpr(3)
COEF_THRESHOLD = tl.constexpr(4)
COEF_PRUNE_COUNT = tl.constexpr(5)
COEF_TEMPERATURE = tl.constexpr(6)
COEF_NM = tl.constexpr(7)
STAT_ALIVE = tl.constexpr(0)
STAT_SUM_ABS_W = tl.constexpr(1)
STAT_SUM_KERNEL = tl.constexpr(2)
STAT_SUM_ABS_G = tl.constexpr(3)
STAT_TM = tl.constexpr(4)
NUM_PARTIALS = tl.constexpr(4)
# Bit sets of statistics (STATS_OUT): 1 << STAT_* per summed statistic, as sparsetrain.contract.STATS_*.
STATS_ALIVE = tl.constexpr(1)
STATS_SUM_ABS_W = tl.constexpr(2)
STATS_SUM_KERNEL = tl.constexpr(4)
STATS_SUM_ABS_G = tl.constexpr(8)
STATS_ALL = tl.constexpr(15)
# A block with at most 1 live element in SPARSE_BLOCK takes the predicated path (dead elements are
# neither read nor written): at 1/8 live, about 1 - (7/8)^8 = 66% of its 32-byte sectors hold one.
SPARSE_BLOCK = tl.constexpr(8)
NEG_LOG2E = tl.constexpr(-1.4426950408889634)  # exp(x) = exp2(x * log2(e))


@triton.jit
def _row_ptr(table, row, t, num_tensors, DTYPE: tl.constexpr):
    return tl.load(table + row * num_tensors + t).to(tl.pointer_type(DTYPE))


@triton.jit
def _row_int(table, row, t, num_tensors):
    return tl.load(table + row * num_tensors + t)


@triton.jit
def _kernel_scale(stats_ptr, coef_ptr):
    """temperature * mean|w| of the previous step (fp64), 0 when undefined."""
    prev_alive = tl.load(stats_ptr + STAT_ALIVE)
    prev_sum = tl.load(stats_ptr + STAT_SUM_ABS_W)
    temperature = tl.load(coef_ptr + COEF_TEMPERATURE).to(tl.float64)
    return tl.where(prev_alive > 0, temperature * prev_sum / tl.maximum(prev_alive, 1.0), 0.0)


@triton.jit
def _popcount(x):
    """Set bits of each int32 (SWAR: three masks, one multiply)."""
    x = x.to(tl.uint32, bitcast=True)
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def fused_step_kernel(
    table,
    num_tensors,
    seeds,
    block_tensor,
    block_local,
    tensor_first_row,
    partials,
    found_inf_ptr,
    lr_ptr,
    lr,
    weight_decay,
    momentum,
    one_minus_dampening,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    eps,
    decay_factor,
    log_betas_ptr,
    PARAM_DTYPE: tl.constexpr,
    STATE_DTYPE: tl.constexpr,
    IS_ADAM: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_STATS: tl.constexpr,
    STATS_OUT: tl.constexpr,
    REGULARIZE: tl.constexpr,
    L1_PROX: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    WIDE_GROUPS: tl.constexpr,
    PRUNE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    ALIGNED: tl.constexpr,
    QUAD_STREAM: tl.constexpr,
    WORDS: tl.constexpr,
    BLOCKS: tl.constexpr,
    NM_M: tl.constexpr = 1,
):
    """One program per group of BLOCKS consecutive blocks (WORDS mask words = WORDS * 32 elements each)
    of one tensor: block_tensor / block_local name the tensor and the group's index in it."""
    program = tl.program_id(0)
    t = tl.load(block_tensor + program)
    group = tl.load(block_local + program).to(tl.int64)  # this program's BLOCKS blocks in tensor t
    numel = _row_int(table, ROW_NUMEL, t, num_tensors)
    num_words = (numel + 31) // 32
    num_blocks = (num_words + WORDS - 1) // WORDS
    first_row = tl.load(tensor_first_row + t).to(tl.int64)  # partial row of the tensor's first program
    mask_ptr = _row_ptr(table, ROW_MASK, t, num_tensors, tl.int32)
    if HAS_MASK:
        group_words = group * (BLOCKS * WORDS) + tl.arange(0, BLOCKS * WORDS).to(tl.int64)
        group_mask = tl.load(mask_ptr + group_words, mask=group_words < num_words, other=0)
        work = tl.sum((group_mask != 0).to(tl.int32), axis=0)  # a dead group reads its mask words, nothing else
    else:
        work = 1
    if HAS_FOUND_INF:  # a skipped step touches nothing (the finish launch ignores the partials)
        work = tl.where(tl.load(found_inf_ptr) == 0, work, 0)
    if work > 0:
        # Per-tensor values, once per program: the block loop stores through pointers the compiler
        # cannot prove apart from these, so it would otherwise reload and recompute them per block.
        param_ptr = _row_ptr(table, ROW_PARAM, t, num_tensors, PARAM_DTYPE)
        grad_ptr = _row_ptr(table, ROW_GRAD, t, num_tensors, PARAM_DTYPE)
        state1_ptr = _row_ptr(table, ROW_STATE1, t, num_tensors, STATE_DTYPE)
        state2_ptr = _row_ptr(table, ROW_STATE2, t, num_tensors, STATE_DTYPE)
        state3_ptr = _row_ptr(table, ROW_STATE3, t, num_tensors, STATE_DTYPE)
        group_ptr = _row_ptr(table, ROW_GROUP, t, num_tensors, tl.float32)
        stats_ptr = _row_ptr(table, ROW_STATS, t, num_tensors, tl.float64)
        coef_ptr = _row_ptr(table, ROW_COEF, t, num_tensors, tl.float32)
        shard_offset = _row_int(table, ROW_SHARD_OFFSET, t, num_tensors)
        inner = _row_int(table, ROW_INNER, t, num_tensors)
        groups = _row_int(table, ROW_GROUPS, t, num_tensors)
        group_rem = 0
        group_first = 0
        inv_inner = 0.0
        inv_groups = 0.0
        if HAS_GROUPS and not WIDE_GROUPS:
            # j(i) = (i // inner) % groups without a 64-bit divide per element: two per program here,
            # then 32-bit quotients of small values through an fp32 reciprocal (see _div_small)
            program_first = group * (BLOCKS * WORDS * 32) + shard_offset
            quotient = program_first // inner
            group_rem = (program_first - quotient * inner).to(tl.int32)  # element offset in its group run
            group_first = (quotient % groups).to(tl.int32)  # the group of the program's first element
            inner = inner.to(tl.int32)
            groups = groups.to(tl.int32)
            inv_inner = 1.0 / inner.to(tl.float32)
            inv_groups = 1.0 / groups.to(tl.float32)
        if LR_ON_DEVICE:
            lr = tl.load(lr_ptr).to(tl.float32)
            decay_factor = 1.0 - lr * weight_decay
        step = tl.load(_row_ptr(table, ROW_STEP, t, num_tensors, tl.float32)) + 1.0
        step_size = lr
        inv_bias_correction2_sqrt = lr
        if IS_ADAM:  # bias corrections in fp64 from log(beta) held in fp64
            step64 = step.to(tl.float64)
            bias_correction1 = 1.0 - tl.exp(step64 * tl.load(log_betas_ptr))
            # its reciprocal: the elements multiply (a division by a per-tensor value costs ~5 instructions)
            bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp(step64 * tl.load(log_betas_ptr + 1)))
            inv_bias_correction2_sqrt = (1.0 / bias_correction2_sqrt).to(tl.float32)
            step_size = (tl.cast(lr, tl.float64) / bias_correction1).to(tl.float32)
        l2 = tl.load(coef_ptr + COEF_L2) if REGULARIZE else 0.0
        l1 = tl.load(coef_ptr + COEF_L1) if REGULARIZE else 0.0
        sd = 0.0
        inv_scale = 0.0
        if REGULARIZE and HAS_STATS:  # selective decay: relevance 1 - |g| / (beta * mean |g| of the last step)
            gbar = tl.load(stats_ptr + STAT_SUM_ABS_G) / tl.maximum(tl.load(stats_ptr + STAT_ALIVE), 1.0)
            scale = tl.load(coef_ptr + COEF_SD_BETA) * gbar.to(tl.float32)
            sd = tl.where(scale > 0, tl.load(coef_ptr + COEF_SD), 0.0)  # no relevance without a scale
            inv_scale = 1.0 / tl.where(scale > 0, scale, 1.0)
        sample = 0
        sample_c = 0.0
        inv_tm = 0.0
        keys = 0
        if PRUNE == PRUNE_STOCHASTIC:
            count = tl.load(coef_ptr + COEF_PRUNE_COUNT)
            kernel_sum = tl.load(stats_ptr + STAT_SUM_KERNEL).to(tl.float32)
            tm = tl.load(stats_ptr + STAT_TM).to(tl.float32)
            # sampling needs all three > 0 (integer flags: the interpreter has no scalar-bool &)
            sample = tl.where(count > 0, 1, 0) * tl.where(kernel_sum > 0, 1, 0) * tl.where(tm > 0, 1, 0)
            # c / UNIFORM_SCALE: the decision compares draws, uniforms / UNIFORM_SCALE (see stream_random)
            # 0 for a tensor that samples none (q = 0: every element is kept)
            sample_c = tl.where(sample != 0, count / (tl.where(sample != 0, kernel_sum, 1.0) * UNIFORM_SCALE), 0.0)
            inv_tm = (1.0 / tl.where(sample != 0, tm, 1.0)) * NEG_LOG2E  # exp(-|w| / tm) = exp2(|w| * inv_tm)
            keys = philox_keys(tl.load(seeds + t))  # the key schedule, once per program
        threshold = tl.load(coef_ptr + COEF_THRESHOLD) if (PRUNE == PRUNE_LOW or PRUNE == PRUNE_HIGH) else 0.0
        nm_n = (tl.load(coef_ptr + COEF_NM).to(tl.int32) % 64) if PRUNE == PRUNE_NM else 0  # contract.nm_code
        kernel_on = 0
        inv_tm_now = 0.0
        if STATS_SUM_KERNEL & STATS_OUT:
            tm_now = _kernel_scale(stats_ptr, coef_ptr)
            kernel_on = tl.where(tm_now > 0, 1, 0)
            inv_tm_now = ((1.0 / tl.where(tm_now > 0, tm_now, 1.0)) * NEG_LOG2E).to(tl.float32)  # as inv_tm
        # statistics: per-thread fp64 sums over the program's blocks (no cross-thread exchange per block),
        # reduced across the program once at its end; a fixed order, so deterministic
        acc_alive = tl.zeros([WORDS], dtype=tl.int32)
        acc_w = tl.zeros([WORDS, 8], dtype=tl.float64)
        acc_kernel = tl.zeros([WORDS, 8], dtype=tl.float64)
        acc_g = tl.zeros([WORDS, 8], dtype=tl.float64)
        for b in range(BLOCKS):
            local = group * BLOCKS + b
            if local < num_blocks:
                word_idx = local * WORDS + tl.arange(0, WORDS).to(tl.int64)
                # streamed whole (vector accesses) when wholly inside the tensor and more than 1/8
                # live; a sparser block moves only the 32-byte sectors that hold live elements
                full = tl.where((local + 1) * (WORDS * 32) <= numel, 1, 0)
                if HAS_MASK:
                    words = tl.load(mask_ptr + word_idx, mask=word_idx < num_words, other=0)
                    live_count = tl.sum(_popcount(words))
                    full = full * tl.where(live_count * SPARSE_BLOCK <= WORDS * 32, 0, 1)
                else:
                    words = tl.full([WORDS], -1, dtype=tl.int32)
                    live_count = 1
                if live_count == 0:  # a dead block: nothing to do
                    pass
                elif full != 0:
                    part_alive, part_w, part_kernel, part_g = _step_block(
                        local, numel, words, param_ptr, grad_ptr,
                        state1_ptr, state2_ptr, state3_ptr, mask_ptr, group_ptr, shard_offset,
                        group_rem + b * (WORDS * 32), group_first, inner, groups, inv_inner, inv_groups, lr,
                        weight_decay, momentum, one_minus_dampening, beta2, one_minus_beta1, one_minus_beta2, eps,
                        decay_factor, step, step_size, inv_bias_correction2_sqrt, l2, l1, sd, inv_scale,
                        sample_c, inv_tm, keys, threshold, kernel_on, inv_tm_now, nm_n,
                        PARAM_DTYPE, IS_ADAM, HAS_MOMENTUM, NESTEROV, MAXIMIZE, DECOUPLED, AMSGRAD, HAS_MASK,
                        HAS_STATS, STATS_OUT, REGULARIZE, L1_PROX, HAS_GROUPS, WIDE_GROUPS, PRUNE, ALIGNED, QUAD_STREAM,
                        WORDS,
                        True, NM_M,
                    )  # fmt: skip
                    acc_alive, acc_w, acc_kernel, acc_g = _accumulate(
                        acc_alive, acc_w, acc_kernel, acc_g, part_alive, part_w, part_kernel, part_g, STATS_OUT
                    )
                else:
                    part_alive, part_w, part_kernel, part_g = _step_block(
                        local, numel, words, param_ptr, grad_ptr,
                        state1_ptr, state2_ptr, state3_ptr, mask_ptr, group_ptr, shard_offset,
                        group_rem + b * (WORDS * 32), group_first, inner, groups, inv_inner, inv_groups, lr,
                        weight_decay, momentum, one_minus_dampening, beta2, one_minus_beta1, one_minus_beta2, eps,
                        decay_factor, step, step_size, inv_bias_correction2_sqrt, l2, l1, sd, inv_scale,
                        sample_c, inv_tm, keys, threshold, kernel_on, inv_tm_now, nm_n,
                        PARAM_DTYPE, IS_ADAM, HAS_MOMENTUM, NESTEROV, MAXIMIZE, DECOUPLED, AMSGRAD, HAS_MASK,
                        HAS_STATS, STATS_OUT, REGULARIZE, L1_PROX, HAS_GROUPS, WIDE_GROUPS, PRUNE, ALIGNED, QUAD_STREAM,
                        WORDS,
                        False, NM_M,
                    )  # fmt: skip
                    acc_alive, acc_w, acc_kernel, acc_g = _accumulate(
                        acc_alive, acc_w, acc_kernel, acc_g, part_alive, part_w, part_kernel, part_g, STATS_OUT
                    )
        if STATS_OUT:  # the program's partial row
            out = partials + (first_row + group) * NUM_PARTIALS + tl.arange(0, NUM_PARTIALS)
            tl.store(out, _partial_row(acc_alive, acc_w, acc_kernel, acc_g, kernel_on, STATS_OUT))
    elif STATS_OUT:  # a dead group (or a skipped step): its partials are zero
        out = partials + (first_row + group) * NUM_PARTIALS + tl.arange(0, NUM_PARTIALS)
        tl.store(out, tl.zeros([NUM_PARTIALS], dtype=tl.float64))


@triton.jit
def _step_block(
    local, numel, words, param_ptr, grad_ptr, state1_ptr, state2_ptr, state3_ptr, mask_ptr, group_ptr,
    shard_offset, group_rem, group_first, inner, groups, inv_inner, inv_groups, lr, weight_decay, momentum,
    one_minus_dampening, beta2, one_minus_beta1, one_minus_beta2, eps, decay_factor, step, step_size,
    inv_bias_correction2_sqrt, l2, l1, sd, inv_scale, sample_c, inv_tm, keys, threshold, kernel_on, inv_tm_now,
    nm_n,
    PARAM_DTYPE: tl.constexpr, IS_ADAM: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_STATS: tl.constexpr, STATS_OUT: tl.constexpr, REGULARIZE: tl.constexpr, L1_PROX: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    WIDE_GROUPS: tl.constexpr, PRUNE: tl.constexpr, ALIGNED: tl.constexpr, QUAD_STREAM: tl.constexpr,
    WORDS: tl.constexpr, FULL: tl.constexpr, NM_M: tl.constexpr,
):  # fmt: skip
    """One block of WORDS * 32 elements with at least one live element. Returns the block's statistics
    (each zero unless its bit is in STATS_OUT): the alive count per mask word ([WORDS] int32, popcounts
    of the packed decisions), and [WORDS, 8] fp64 sums of four consecutive elements of |w|, the kernel
    terms and |g|: four consecutive elements are held by one thread, so these sums stay in registers.

    FULL: the block lies wholly inside the tensor and is not sparse; unmasked (vectorizable) loads
    and stores, a dead element is read and written back unchanged, so memory sees the same values
    as if it had been skipped. Otherwise (the tail block, or a sparse one) loads and stores are
    predicated on the live elements: dead ones are neither read nor written. Per-tensor values
    arrive computed (see the kernel).
    """
    word_idx, offs, inside = block_elements(local, numel, WORDS, FULL)
    global_offs = offs + shard_offset  # index in the unsharded tensor
    live = unpack_live(words, inside) if HAS_MASK else inside
    io = inside if FULL else live  # what loads and stores touch (FULL: everything, unmasked)

    # every load of the block first: their addresses depend on nothing loaded, so all of them are in
    # flight together (one memory round trip per block)
    start = local * (WORDS * 32)
    w_in = load_block_f32(param_ptr, offs, start, io, ALIGNED, FULL)  # exact: rounds back to what was read
    g_raw = load_block_f32(grad_ptr, offs, start, io, ALIGNED, FULL)
    if IS_ADAM:
        m_old = load_block_f32(state1_ptr, offs, start, io, ALIGNED, FULL)
        v_old = load_block_f32(state2_ptr, offs, start, io, ALIGNED, FULL)
        if AMSGRAD:
            vmax_old = load_block_f32(state3_ptr, offs, start, io, ALIGNED, FULL)
    elif HAS_MOMENTUM:
        buf_old = load_block_f32(state1_ptr, offs, start, io, ALIGNED, FULL)
    # a dead element's values take part in the arithmetic below but never in a result: every store,
    # mask bit and statistic selects on `live` / `keep` (predicated blocks read zeros for them)
    w = w_in
    g = -g_raw if MAXIMIZE else g_raw

    # regularization gradient; terms whose per-tensor coefficient is zero are skipped by uniform branches
    r = tl.zeros([WORDS, 32], dtype=tl.float32)
    if HAS_GROUPS:
        if WIDE_GROUPS:  # a group run or a group count near 2**30: 64-bit arithmetic
            group = (global_offs // inner) % groups
        else:  # group_rem: offset of the block's first element in its run of `inner`, whose group is group_first
            in_block = tl.arange(0, WORDS)[:, None] * 32 + tl.arange(0, 32)[None, :]
            group = group_first + _div_small(group_rem + in_block, inner, inv_inner)
            group = group - _div_small(group, groups, inv_groups) * groups
        r = r + tl.load(group_ptr + group, mask=live, other=0.0) * w
    if REGULARIZE:
        r = r + l2 * w
        if not L1_PROX:
            if l1 != 0:
                r = r + l1 * tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))
        if HAS_STATS:
            if sd != 0:
                # clamp(min=0) as torch: a NaN relevance (NaN gradient, or inf / inf) stays NaN
                r = r + sd * w * tl.maximum(1.0 - tl.abs(g_raw) * inv_scale, 0.0, propagate_nan=tl.PropagateNan.ALL)

    # optimizer update
    if IS_ADAM:
        if DECOUPLED:
            w = w * decay_factor
        else:
            g = g + weight_decay * w
        if HAS_GROUPS or REGULARIZE:
            g = g + r
        weight = one_minus_beta1
        m = tl.where(weight < 0.5, m_old + weight * (g - m_old), g - (g - m_old) * (1.0 - weight))  # torch.lerp
        v = v_old * beta2 + one_minus_beta2 * (g * g)
        if AMSGRAD:
            vmax = tl.maximum(vmax_old, v, propagate_nan=tl.PropagateNan.ALL)  # torch.maximum: NaN from either side
            denom = tl.sqrt(vmax) * inv_bias_correction2_sqrt + eps
        else:
            denom = tl.sqrt(v) * inv_bias_correction2_sqrt + eps
        # div.approx: 2 ulp, as the full-range division Triton emits for `/`, for denominators in
        # [2**-126, 2**126]: denom >= eps, and below 2**126 for any finite fp32 v (2 instructions, not ~9)
        w = w - step_size * tl.math.fdiv(m, denom, approx=True)
    else:
        g = g + weight_decay * w
        if HAS_GROUPS or REGULARIZE:
            g = g + r
        if HAS_MOMENTUM:
            buf = tl.where(step == 1.0, g, buf_old * momentum + one_minus_dampening * g)
            if NESTEROV:
                g = g + momentum * buf
            else:
                g = buf
        w = w - lr * g
    if REGULARIZE:
        if L1_PROX:
            if l1 != 0:  # uniform per tensor; sign(w) * max(|w| - s, 0) as w - clamp(w, -s, s) (same rounding)
                shrink = lr * l1
                w = w - tl.minimum(tl.maximum(w, -shrink), shrink)

    # pruning decision on the updated weights
    keep = live
    if PRUNE == PRUNE_STOCHASTIC:
        # branch-free: a tensor that samples none has sample_c = 0, so q = 0 and every element is kept
        q = sample_c * tl.exp2(tl.abs(w) * inv_tm)
        if QUAD_STREAM:  # one Philox call per four elements
            draw = block_uniforms(keys, local * (WORDS * 32) + shard_offset, WORDS, True, True)
        else:  # some shard starts inside a quad of the stream: one call per element
            draw = element_uniforms(keys, global_offs, True, True)
        keep = live & ~(tl.abs(draw) < q)  # as the reference: a NaN q (a NaN weight) prunes nothing
    elif PRUNE == PRUNE_LOW:
        keep = live & (tl.abs(w) >= threshold)
    elif PRUNE == PRUNE_HIGH:
        keep = live & (tl.abs(w) <= threshold)
    elif PRUNE == PRUNE_GROUP:
        flagged = tl.load(group_ptr + groups + group, mask=live, other=0.0)
        keep = live & (flagged == 0)
    elif PRUNE == PRUNE_NM:
        keep = live & _nm_keep(tl.abs(w), live, nm_n, WORDS, NM_M)

    # writes: pruned-now elements become zero; dead-before elements get back what was read.
    # With fp64 sums the zero is `step * 0.0` (+0.0, which the compiler cannot see as a constant):
    # |w| of the statistics is then this select's result (no second select), and the fp64
    # conversion stays after it (with a constant zero the compiler sinks the select past the
    # conversion, two selects of the 64-bit halves)
    FP64_SUMS: tl.constexpr = (STATS_SUM_ABS_W | STATS_SUM_KERNEL | STATS_SUM_ABS_G) & STATS_OUT
    zero = step * 0.0 if FP64_SUMS else 0.0
    w = tl.where(keep, w, zero)
    # chosen in fp32, then rounded once: 16-bit parameters are packed two to a register in one instruction
    store_block(param_ptr, offs, tl.where(live, w, w_in).to(PARAM_DTYPE), io, ALIGNED, FULL)
    if IS_ADAM:
        store_block(state1_ptr, offs, tl.where(keep, m, tl.where(live, 0.0, m_old)), io, ALIGNED, FULL)
        store_block(state2_ptr, offs, tl.where(keep, v, tl.where(live, 0.0, v_old)), io, ALIGNED, FULL)
        if AMSGRAD:
            store_block(state3_ptr, offs, tl.where(keep, vmax, tl.where(live, 0.0, vmax_old)), io, ALIGNED, FULL)
    elif HAS_MOMENTUM:
        store_block(state1_ptr, offs, tl.where(keep, buf, tl.where(live, 0.0, buf_old)), io, ALIGNED, FULL)
    if HAS_MASK and PRUNE == PRUNE_NONE and FULL:
        keep_words = words  # keep = live: every bit of a full block's words is inside the tensor
    elif (HAS_MASK and PRUNE != PRUNE_NONE) or (STATS_ALIVE & STATS_OUT) != 0:
        bits = tl.where(keep, 1 << tl.arange(0, 32)[None, :], 0)
        keep_words = tl.sum(bits, axis=1)  # packed as unpack_live reads
    if HAS_MASK and PRUNE != PRUNE_NONE:  # without a decision the mask words cannot change
        tl.store(mask_ptr + word_idx, keep_words, mask=(word_idx * 32 < numel) & (words != 0))

    part_alive = tl.zeros([WORDS], dtype=tl.int32)
    part_w = tl.zeros([WORDS, 8], dtype=tl.float64)
    part_kernel = tl.zeros([WORDS, 8], dtype=tl.float64)
    part_g = tl.zeros([WORDS, 8], dtype=tl.float64)
    # only the statistics of STATS_OUT; selects of 32-bit values before the fp64 conversions, whose
    # abs modifier takes |x|
    abs_w = tl.abs(w)  # zero for pruned and dead elements (the select above)
    if STATS_ALIVE & STATS_OUT:
        part_alive = _popcount(keep_words)  # exact count per word, from the packed decisions
    if STATS_SUM_ABS_W & STATS_OUT:
        part_w = _quad_sums(abs_w.to(tl.float64), WORDS)
    if STATS_SUM_KERNEL & STATS_OUT:
        # computed also while the kernel is off (kernel_on = 0: the program's sum is dropped at its end),
        # so that no branch splits the block while the decisions are held
        part_kernel = _quad_sums(tl.where(keep, tl.exp2(abs_w * inv_tm_now), zero).to(tl.float64), WORDS)
    if STATS_SUM_ABS_G & STATS_OUT:
        part_g = _quad_sums(tl.where(keep, tl.abs(g_raw), zero).to(tl.float64), WORDS)
    return part_alive, part_w, part_kernel, part_g


@triton.jit
def _nm_keep(a, live, n, WORDS: tl.constexpr, M: tl.constexpr):
    """N:M decision (sparsetrain.contract) on [WORDS, 32] magnitudes: groups of M consecutive elements
    (M divides 32, so a group lies in one mask word); element j stays when fewer than n live elements of
    its group have a larger |w|, or an equal one at a lower index."""
    G: tl.constexpr = WORDS * 32 // M
    a2 = tl.reshape(a, [G, M])
    live2 = tl.reshape(live.to(tl.int32), [G, M])
    idx = tl.arange(0, M)
    ak, aj = a2[:, None, :], a2[:, :, None]  # [G, j, k]
    beats = (ak > aj) | ((ak == aj) & (idx[None, None, :] < idx[None, :, None]))
    rank = tl.sum(tl.where(beats, live2[:, None, :], 0), axis=2)
    return tl.reshape(rank < n, [WORDS, 32])


@triton.jit
def _div_small(x, d, inv_d):
    """x // d for int32 0 <= x and d > 0 with x + d < 2**31 and a quotient below 2**20: the fp32 estimate
    (relative error a few 2**-24) is off by at most one, which one comparison corrects."""
    q = (x.to(tl.float32) * inv_d).to(tl.int32)
    r = x - q * d
    return tl.where(r < 0, q - 1, tl.where(r >= d, q + 1, q))


@triton.jit
def _quad_sums(x, WORDS: tl.constexpr):
    """[WORDS, 32] -> [WORDS, 8]: sums of four consecutive elements (one thread holds them)."""
    return tl.sum(tl.reshape(x, [WORDS, 8, 4]), axis=2)


@triton.jit
def _accumulate(acc_alive, acc_w, acc_kernel, acc_g, alive, sum_w, sum_kernel, sum_g, STATS_OUT: tl.constexpr):
    """The program's statistics plus a block's, for the statistics of STATS_OUT only: a sum no step
    reads is not added per block (a floating-point add of zero is an instruction the compiler keeps)."""
    if STATS_ALIVE & STATS_OUT:
        acc_alive = acc_alive + alive
    if STATS_SUM_ABS_W & STATS_OUT:
        acc_w = acc_w + sum_w
    if STATS_SUM_KERNEL & STATS_OUT:
        acc_kernel = acc_kernel + sum_kernel
    if STATS_SUM_ABS_G & STATS_OUT:
        acc_g = acc_g + sum_g
    return acc_alive, acc_w, acc_kernel, acc_g


@triton.jit
def _partial_row(alive, sum_w, sum_kernel, sum_g, kernel_on, STATS_OUT: tl.constexpr):
    """The four fixed-order sums of a program's per-thread statistics, as one [4] row: only those of
    STATS_OUT are reduced, the others are 0 (and the kernel sum 0 unless kernel_on: without a scale of
    the previous step the kernel terms are undefined)."""
    i = tl.arange(0, NUM_PARTIALS)
    a = tl.sum(alive).to(tl.float64) if STATS_ALIVE & STATS_OUT else tl.zeros([], dtype=tl.float64)
    b = tl.sum(sum_w) if STATS_SUM_ABS_W & STATS_OUT else tl.zeros([], dtype=tl.float64)
    c = tl.sum(sum_kernel) if STATS_SUM_KERNEL & STATS_OUT else tl.zeros([], dtype=tl.float64)
    d = tl.sum(sum_g) if STATS_SUM_ABS_G & STATS_OUT else tl.zeros([], dtype=tl.float64)
    c = tl.where(kernel_on != 0, c, 0.0)
    return tl.where(i == 0, a, tl.where(i == 1, b, tl.where(i == 2, c, d)))


@triton.jit
def reduce_partials_kernel(src, dst, segment_first, segment_rows, CHUNK: tl.constexpr):
    """dst[s] = fixed-order sum of the partial rows src[first_s : first_s + rows_s] (one program each)."""
    s = tl.program_id(0)
    first = tl.load(segment_first + s).to(tl.int64)
    acc = _sum_rows(src, first, first + tl.load(segment_rows + s), CHUNK)
    tl.store(dst + s.to(tl.int64) * NUM_PARTIALS + tl.arange(0, NUM_PARTIALS), acc)


@triton.jit
def _sum_rows(src, first, end, CHUNK: tl.constexpr):
    """Column sums of the partial rows [first, end), CHUNK rows at a time, in a fixed order."""
    cols = tl.arange(0, NUM_PARTIALS)
    acc = tl.zeros([NUM_PARTIALS], dtype=tl.float64)
    for start in range(first, end, CHUNK):
        rows = start + tl.arange(0, CHUNK)
        values = tl.load(src + rows[:, None] * NUM_PARTIALS + cols[None, :], mask=rows[:, None] < end, other=0.0)
        acc += tl.sum(values, axis=0)
    return acc


@triton.jit
def finish_step_kernel(
    table,
    num_tensors,
    tensor_first_partial,
    tensor_num_partials,
    partials,
    found_inf_ptr,
    STATS_OUT: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Per tensor: step += 1 and (STATS_OUT, a nonzero bit set) stats = fixed-order sum of its programs'
    partials (0 for the statistics not in STATS_OUT), and STAT_TM = this step's kernel scale when the
    kernel sum is computed, else 0 (one program each)."""
    t = tl.program_id(0)
    advance = 1
    if HAS_FOUND_INF:
        advance = tl.where(tl.load(found_inf_ptr) == 0, 1, 0)
    step_ptr = _row_ptr(table, ROW_STEP, t, num_tensors, tl.float32)
    tl.store(step_ptr, tl.load(step_ptr) + advance)
    if STATS_OUT:
        stats_ptr = _row_ptr(table, ROW_STATS, t, num_tensors, tl.float64)
        tm_now = tl.zeros([], dtype=tl.float64)
        if STATS_SUM_KERNEL & STATS_OUT:
            tm_now = _kernel_scale(stats_ptr, _row_ptr(table, ROW_COEF, t, num_tensors, tl.float32))
        first = tl.load(tensor_first_partial + t).to(tl.int64)
        acc = _sum_rows(partials, first, first + tl.load(tensor_num_partials + t), CHUNK)
        cols = tl.arange(0, NUM_PARTIALS)
        tl.store(stats_ptr + cols, acc, mask=cols < advance * NUM_PARTIALS)
        tl.store(stats_ptr + STAT_TM, tl.where(advance > 0, tm_now, tl.load(stats_ptr + STAT_TM)))
