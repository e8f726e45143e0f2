"""The project's random stream in Triton: one Philox4x32-10 call per four consecutive elements.

Element i of a tensor (its index in the full, unsharded tensor) takes word ``i & 3`` of
``tl.randint4x(seed, i >> 2)``, turned into a float32 uniform by ``uint_to_uniform_float`` (that is,
``tl.rand4x(seed, i >> 2)[i & 3]``). ``sparsetrain.philox.rand`` is the same stream in torch.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def block_uniforms(seed, block_start, WORDS: tl.constexpr):
    """Uniforms of elements ``block_start + [0, WORDS * 32)`` laid out [WORDS, 32] (element 32 r + c at
    [r, c]); ``block_start`` must be a multiple of 4. One Philox call per 4 elements: the four words
    of quad k land on the four consecutive elements 4k .. 4k + 3, interleaved in registers."""
    quads = (block_start >> 2) + (tl.arange(0, WORDS)[:, None] * 8 + tl.arange(0, 8)[None, :]).to(tl.int64)
    u0, u1, u2, u3 = tl.rand4x(seed, quads)
    u = tl.join(tl.join(u0, u2), tl.join(u1, u3))  # [WORDS, 8, 2, 2], [r, k, b, a] = word 2 b + a
    return tl.reshape(u, [WORDS, 32])


@triton.jit
def element_uniforms(seed, index):
    """Uniforms of arbitrary element indices (one Philox call each; for blocks not starting at a
    multiple of 4, such as a shard at an odd offset)."""
    u0, u1, u2, u3 = tl.rand4x(seed, index >> 2)
    lane = index & 3
    return tl.where(lane < 2, tl.where(lane == 0, u0, u1), tl.where(lane == 2, u2, u3))
