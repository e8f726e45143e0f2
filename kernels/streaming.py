"""Block layout and streaming loads and stores shared by the kernels.

A block is WORDS mask words of 32 elements each: element ``32 * i + j`` of the block is bit ``j`` of
its word ``i`` (the bit-packed mask format, ``sparsetrain.masks``).

A block that lies wholly inside its tensor (``FULL``) is read and written without a mask, so the
compiler can use 16-byte vector accesses; otherwise accesses are predicated on the given mask
(bounds for a tail block, or the live elements of a sparse one). ``ALIGNED`` declares
each row of addresses 16-byte aligned, for base addresses read from a table (kernel pointer
arguments carry that fact already, from Triton's argument specialization).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def block_pointers(base, offs, ALIGNED: tl.constexpr):
    """Element addresses; declared 16-byte aligned per row when the host checked every base address."""
    ptrs = base + offs
    if ALIGNED:
        ptrs = tl.multiple_of(ptrs, [16, 16])
    # at most 4 consecutive elements per thread: every tensor of a block shares one register layout
    # (16-byte accesses for 32-bit values, 8-byte for 16-bit ones), so no values move between threads
    return tl.max_contiguous(ptrs, [1, 4])


@triton.jit
def load_block(base, offs, mask, ALIGNED: tl.constexpr, FULL: tl.constexpr):
    if FULL:  # no mask: the compiler can use 16-byte vector loads
        value = tl.load(block_pointers(base, offs, ALIGNED))
    else:
        value = tl.load(block_pointers(base, offs, ALIGNED), mask=mask, other=0.0)
    return value


@triton.jit
def load_block_f32(base, offs, start, mask, ALIGNED: tl.constexpr, FULL: tl.constexpr):
    """``load_block(...).to(tl.float32)`` (``start``: the block's first element, ``offs[0, 0]``). A full
    block of bfloat16 is read as int32 pairs and widened by bit operations (a shift for the low
    element, an and for the high one: one instruction each, where the plain conversion spends a byte
    permute and a shift on each high element). The result's bits never come from a conversion of
    the loaded value, so selecting it back for a store does not fold into a 16-bit select."""
    if FULL and base.dtype.element_ty == tl.bfloat16:
        WORDS: tl.constexpr = offs.shape[0]
        pair_offs = tl.arange(0, WORDS)[:, None] * 16 + tl.arange(0, 16)[None, :]  # int32, from the block's start
        ptrs = (base + start).to(tl.pointer_type(tl.int32)) + pair_offs
        if ALIGNED:
            ptrs = tl.multiple_of(ptrs, [16, 16])
        packed = tl.load(tl.max_contiguous(ptrs, [1, 2]))  # two pairs (four elements) per thread
        low = (packed << 16).to(tl.float32, bitcast=True)
        high = (packed & -65536).to(tl.float32, bitcast=True)
        value = tl.reshape(tl.join(low, high), [WORDS, 32])
    else:
        value = load_block(base, offs, mask, ALIGNED, FULL).to(tl.float32)
    return value


@triton.jit
def store_block(base, offs, value, mask, ALIGNED: tl.constexpr, FULL: tl.constexpr):
    if FULL:
        tl.store(block_pointers(base, offs, ALIGNED), value)
    else:
        tl.store(block_pointers(base, offs, ALIGNED), value, mask=mask)


@triton.jit
def block_elements(local, numel, WORDS: tl.constexpr, FULL: tl.constexpr):
    """Block ``local``'s mask-word indices [WORDS], element offsets [WORDS, 32] and which of those
    lie inside the tensor (all of them for a FULL block, known at compile time)."""
    word_idx = local * WORDS + tl.arange(0, WORDS).to(tl.int64)
    offs = word_idx[:, None] * 32 + tl.arange(0, 32)[None, :]
    if FULL:
        inside = tl.full([WORDS, 32], True, dtype=tl.int1)
    else:
        inside = offs < numel
    return word_idx, offs, inside


@triton.jit
def unpack_live(words, inside):
    """The elements of the block whose mask bit is set, among those ``inside``."""
    return inside & ((words[:, None] & (1 << tl.arange(0, 32))[None, :]) != 0)  # one bit test per element
