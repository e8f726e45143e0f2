"""Masked weights for the autograd path: one pass forward, one pass backward.

    forward : out = w * a                                   (a = mask bit, bit-packed int32 words)
    backward: grad_w = (grad + l2 * w + l1 * sign(w)) * a   (l2, l1 read from the tensor's coefs)

Bytes per element, fp32: forward reads w (4) + 1 bit and writes 4; backward reads grad and w (8)
+ 1 bit and writes 4. Dead elements are written as zero. Blocks wholly inside the tensor use
unmasked (16-byte vector) accesses. Math in fp32, outputs in the weight's dtype; offsets int64.
No randomness.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .streaming import block_elements, load_block, store_block, unpack_live

COEF_L2 = tl.constexpr(0)  # sparsetrain.contract.COEF_L2
COEF_L1 = tl.constexpr(1)  # sparsetrain.contract.COEF_L1


@triton.jit
def _alive(mask_ptr, numel, WORDS: tl.constexpr, FULL: tl.constexpr):
    word_idx, offs, inside = block_elements(tl.program_id(0).to(tl.int64), numel, WORDS, FULL)
    words = tl.load(mask_ptr + word_idx, mask=word_idx < (numel + 31) // 32, other=0)
    return offs, inside, unpack_live(words, inside)


@triton.jit
def _forward(weight_ptr, mask_ptr, out_ptr, numel, WORDS: tl.constexpr, FULL: tl.constexpr):
    offs, inside, live = _alive(mask_ptr, numel, WORDS, FULL)
    w = load_block(weight_ptr, offs, inside, False, FULL)
    store_block(out_ptr, offs, tl.where(live, w, 0.0), inside, False, FULL)


@triton.jit
def masked_weight_forward_kernel(weight_ptr, mask_ptr, out_ptr, numel, WORDS: tl.constexpr):
    if (tl.program_id(0).to(tl.int64) + 1) * (WORDS * 32) <= numel:
        _forward(weight_ptr, mask_ptr, out_ptr, numel, WORDS, True)
    else:
        _forward(weight_ptr, mask_ptr, out_ptr, numel, WORDS, False)


@triton.jit
def _backward(grad_ptr, weight_ptr, mask_ptr, coef_ptr, out_ptr, numel, WORDS: tl.constexpr, FULL: tl.constexpr):
    offs, inside, live = _alive(mask_ptr, numel, WORDS, FULL)
    g = load_block(grad_ptr, offs, inside, False, FULL).to(tl.float32)
    w = load_block(weight_ptr, offs, inside, False, FULL).to(tl.float32)
    sign = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))
    result = g + tl.load(coef_ptr + COEF_L2) * w + tl.load(coef_ptr + COEF_L1) * sign
    store_block(out_ptr, offs, tl.where(live, result, 0.0).to(out_ptr.dtype.element_ty), inside, False, FULL)


@triton.jit
def masked_weight_backward_kernel(grad_ptr, weight_ptr, mask_ptr, coef_ptr, out_ptr, numel, WORDS: tl.constexpr):
    if (tl.program_id(0).to(tl.int64) + 1) * (WORDS * 32) <= numel:
        _backward(grad_ptr, weight_ptr, mask_ptr, coef_ptr, out_ptr, numel, WORDS, True)
    else:
        _backward(grad_ptr, weight_ptr, mask_ptr, coef_ptr, out_ptr, numel, WORDS, False)
