"""The project's random stream in Triton: one Philox4x32-10 call per four consecutive elements.

Element i of a tensor (its index in the full, unsharded tensor) takes word ``i & 3`` of
``tl.randint4x(seed, i >> 2)``, turned into a float32 uniform by ``uint_to_uniform_float`` (that is,
``tl.rand4x(seed, i >> 2)[i & 3]``). ``sparsetrain.philox.rand`` is the same stream in torch.

``_rand4x`` computes exactly what ``tl.rand4x`` computes (checked bit for bit in tests/test_philox.py),
with each round's two 32 x 32 -> 64-bit products as one widening multiply each (``mul.wide.u32``:
one instruction for the high and low words, where ``umulhi`` and a separate low multiply take two).
"""

from __future__ import annotations

import triton
import triton.language as tl

PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
UNIFORM_SCALE = tl.constexpr(4.6566127342e-10)  # tl.random.uint_to_uniform_float's int32 scale


@triton.jit
def philox_keys(seed):
    """The key schedule of Philox4x32-10 under ``seed`` (an integer scalar): a tuple of the ten rounds'
    (k0, k1), flattened. Computed once per program, outside the block loop."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    # round r adds r * KEY_A and r * KEY_B (mod 2**32) to the seed's words
    return (
        k0, k1, k0 + 0x9E3779B9, k1 + 0xBB67AE85, k0 + 0x3C6EF372, k1 + 0x76CF5D0A, k0 + 0xDAA66D2B,
        k1 + 0x32370B8F, k0 + 0x78DDE6E4, k1 + 0xED9EBA14, k0 + 0x1715609D, k1 + 0xA9066899, k0 + 0xB54CDA56,
        k1 + 0x646E171E, k0 + 0x5384540F, k1 + 0x1FD5C5A3, k0 + 0xF1BBCDC8, k1 + 0xDB3D7428, k0 + 0x8FF34781,
        k1 + 0x96A522AD,
    )  # fmt: skip


@triton.jit
def _rand4x(keys, offset):
    """``tl.rand4x(seed, offset)`` for int64 ``offset``, ``keys = philox_keys(seed)`` (Philox4x32-10)."""
    c0, c1, c2, c3 = _philox(keys, offset.to(tl.uint32), (offset >> 32).to(tl.uint32))
    return _uniform(c0), _uniform(c1), _uniform(c2), _uniform(c3)


@triton.jit
def _draw4x(keys, low, high, SIGNED: tl.constexpr = False):
    """The four words of ``_rand4x`` as draws: ``|float(int32 word)|``, which times ``UNIFORM_SCALE``
    is the uniform up to one rounding (relative 2**-24; the uniform widens ``-x - 1``, the draw
    ``-x``): compare a draw with ``q / UNIFORM_SCALE`` instead of a uniform with ``q``, two
    instructions per element instead of five. The counter is ``low + 2**32 * high`` (uint32 words)."""
    c0, c1, c2, c3 = _philox(keys, low, high)
    return _draw(c0, SIGNED), _draw(c1, SIGNED), _draw(c2, SIGNED), _draw(c3, SIGNED)


@triton.jit
def _philox(keys, c0, c1):
    """The four uint32 words of Philox4x32-10 at counter (c0 + 2**32 * c1, 0, 0), as ``tl.randint4x``;
    ``keys`` from ``philox_keys``. ``c1`` may be a scalar (a block of consecutive counters that share
    their high word): the first round's output word 0 and the second round's product of it are then
    one value for the whole block, not one per call."""
    zero = c0 * 0
    c2 = zero
    c3 = zero
    for r in tl.static_range(10):
        product_b = c2.to(tl.uint64) * PHILOX_ROUND_B
        product_a = c0.to(tl.uint64) * PHILOX_ROUND_A
        c0 = (product_b >> 32).to(tl.uint32) ^ c1 ^ keys[2 * r]
        c2 = (product_a >> 32).to(tl.uint32) ^ c3 ^ keys[2 * r + 1]
        c1 = product_b.to(tl.uint32)
        c3 = product_a.to(tl.uint32)
    return c0, c1, c2, c3


@triton.jit
def _draw(x, SIGNED: tl.constexpr = False):
    """``|float(int32 word)|``; SIGNED: ``float(int32 word)``, the draw's sign left to the caller (whose
    compare can then take the absolute value for free)."""
    value = x.to(tl.int32, bitcast=True).to(tl.float32)
    return value if SIGNED else tl.abs(value)


@triton.jit
def _uniform(x):
    """``tl.random.uint_to_uniform_float`` of a uint32."""
    x = x.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, -x - 1, x)
    return x.to(tl.float32) * UNIFORM_SCALE


@triton.jit
def block_uniforms(keys, block_start, WORDS: tl.constexpr, DRAWS: tl.constexpr = False, SIGNED: tl.constexpr = False):
    """Uniforms of elements ``block_start + [0, WORDS * 32)`` laid out [WORDS, 32] (element 32 r + c at
    [r, c]); ``block_start`` must be a multiple of 4. One Philox call per 4 elements: the four words
    of quad k land on the four consecutive elements 4k .. 4k + 3, interleaved in registers. DRAWS:
    draws (see ``_draw4x``) instead of uniforms; SIGNED: draws before their absolute value (``_draw``).
    With DRAWS the block must not straddle a multiple of 2**34 elements (its counters i >> 2 share
    their high word, which the calls then take as one value)."""
    quad = tl.arange(0, WORDS)[:, None] * 8 + tl.arange(0, 8)[None, :]  # quads of the block, [WORDS, 8]
    first = (block_start >> 2).to(tl.int64)
    if DRAWS:
        u0, u1, u2, u3 = _draw4x(keys, first.to(tl.uint32) + quad.to(tl.uint32), (first >> 32).to(tl.uint32), SIGNED)
    else:
        u0, u1, u2, u3 = _rand4x(keys, first + quad.to(tl.int64))
    u = tl.join(tl.join(u0, u2), tl.join(u1, u3))  # [WORDS, 8, 2, 2], [r, k, b, a] = word 2 b + a
    return tl.reshape(u, [WORDS, 32])


@triton.jit
def element_uniforms(keys, index, DRAWS: tl.constexpr = False, SIGNED: tl.constexpr = False):
    """Uniforms (DRAWS: draws, SIGNED as in ``block_uniforms``) of arbitrary element indices (one
    Philox call each; for blocks not starting at a multiple of 4, such as a shard at an odd offset)."""
    if DRAWS:
        u0, u1, u2, u3 = _draw4x(keys, (index >> 2).to(tl.uint32), (index >> 34).to(tl.uint32), SIGNED)
    else:
        u0, u1, u2, u3 = _rand4x(keys, index >> 2)
    lane = index & 3
    return tl.where(lane < 2, tl.where(lane == 0, u0, u1), tl.where(lane == 2, u2, u3))
