"""Streaming loads and stores shared by the kernels.

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
    return ptrs


@triton.jit
def load_block(base, offs, mask, ALIGNED: tl.constexpr, FULL: tl.constexpr):
    if FULL:  # no mask: the compiler can use 16-byte vector loads
        value = tl.load(block_pointers(base, offs, ALIGNED))
    else:
        value = tl.load(block_pointers(base, offs, ALIGNED), mask=mask, other=0.0)
    return value


@triton.jit
def store_block(base, offs, value, mask, ALIGNED: tl.constexpr, FULL: tl.constexpr):
    if FULL:
        tl.store(block_pointers(base, offs, ALIGNED), value)
    else:
        tl.store(block_pointers(base, offs, ALIGNED), value, mask=mask)
