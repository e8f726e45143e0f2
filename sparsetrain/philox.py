"""Philox4x32-10 and seed derivation, in plain torch, bit-identical to ``triton.language.random``.

The random stream contract (docs/design.md, "The random stream"):

* key = (seed & 0xffffffff, seed >> 32). One Philox call serves four consecutive elements: element
  i uses counter = ((i >> 2) low 32 bits, (i >> 2) high 32 bits, 0, 0) and output word ``i & 3``
  (``tl.randint4x`` / ``tl.rand4x`` at offset ``i >> 2``).
* uniform (``tl.rand``): the word read as int32, replaced by ``~x`` when negative, converted to
  float32 and multiplied by the float32 constant ``4.6566127342e-10`` (the largest scale with
  ``(2**31 - 1) * scale < 1``; about 2**-31).
* i = the element's index in the full, unsharded tensor.

Every 32-bit product is formed from 16-bit limbs in int64, so no intermediate overflows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from . import scan

MASK32 = 0xFFFFFFFF
MASK63 = (1 << 63) - 1
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
UNIFORM_SCALE = 4.6566127342e-10  # triton.language.random.uint_to_uniform_float, 32-bit case


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product of the constant ``a`` and uint32 values ``b``."""
    a0, a1 = a & 0xFFFF, a >> 16
    b0, b1 = b & 0xFFFF, b >> 16
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> 16) + (p01 & 0xFFFF) + (p10 & 0xFFFF)
    lo = ((mid & 0xFFFF) << 16) | (p00 & 0xFFFF)
    hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
    return hi, lo


def philox4x32(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    key: tuple[int, int],
    rounds: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 on int64 tensors holding uint32 values; returns the four output words."""
    c0, c1, c2, c3 = (c.to(torch.int64) & MASK32 for c in counter)
    k0, k1 = key[0] & MASK32, key[1] & MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & MASK32
        k1 = (k1 + _KEY_B) & MASK32
    return c0, c1, c2, c3


def randint4x(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tl.randint4x(seed, offsets)``: the four Philox words per offset, uint32 values held in int64."""
    offsets = offsets.to(torch.int64)
    zeros = torch.zeros_like(offsets)
    seed = int(seed)
    key = (seed & MASK32, (seed >> 32) & MASK32)
    return philox4x32((offsets & MASK32, (offsets >> 32) & MASK32, zeros, zeros), key)


def uint_to_uniform(word: torch.Tensor) -> torch.Tensor:
    """``uint_to_uniform_float`` of uint32 words (held in int64): float32 in [0, 1)."""
    signed = torch.where(word >= 1 << 31, word - (1 << 32), word)
    signed = torch.where(signed < 0, -signed - 1, signed).to(torch.int32)
    return signed.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=word.device)


def randint(seed: int, index: torch.Tensor) -> torch.Tensor:
    """The stream's random word of each element ``index`` (int64, any shape): word ``index & 3`` of
    Philox at counter ``index >> 2``, as uint32 values in int64.

    Philox runs once per distinct counter: for the index ranges of a tensor or a shard (the usual
    case) that is one call per four elements, as in the kernels.
    """
    index = index.to(torch.int64)
    if index.numel() == 0:
        return torch.zeros_like(index)
    counter = index >> 2
    first, last = int(counter.min()), int(counter.max())
    if last - first < 2 * index.numel():  # dense range: each counter once, then gather
        words = torch.stack(randint4x(seed, torch.arange(first, last + 1, device=index.device)), dim=-1)
        return words[(counter - first).reshape(-1), (index & 3).reshape(-1)].reshape(index.shape)
    words = torch.stack(randint4x(seed, counter), dim=-1)  # scattered indices: one call each
    return torch.gather(words, -1, (index & 3).unsqueeze(-1)).squeeze(-1)


def rand(seed: int, index: torch.Tensor) -> torch.Tensor:
    """The stream's uniform of each element ``index``: float32 in [0, 1), bit-identical to the kernels'
    ``tl.rand4x(seed, index >> 2)[index & 3]``."""
    return uint_to_uniform(randint(seed, index))


def splitmix64(x: int) -> int:
    """The splitmix64 finalizer on a Python int (mod 2**64)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def event_seed(base_seed: int, tensor_index: int, event: int) -> int:
    """Seed of tensor ``tensor_index`` at pruning event ``event`` (63 bits, host-side)."""
    mixed = splitmix64(base_seed) ^ splitmix64(((tensor_index << 32) | event) & 0xFFFFFFFFFFFFFFFF)
    return splitmix64(mixed) & MASK63


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """:func:`splitmix64` on a uint64 array (numpy's uint64 arithmetic wraps mod 2**64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def event_seeds(base_seed: int, tensor_indices: Sequence[int] | np.ndarray, event: int) -> torch.Tensor:
    """:func:`event_seed` for many tensors at once, as an int64 CPU tensor: one pass per step (in C++
    with the native extension, else vectorized numpy) instead of three Python-int hashes per tensor,
    which cost ~1 us each on the step's hot path."""
    module = scan.native()
    if module is not None:
        indices = tensor_indices if isinstance(tensor_indices, (list, tuple)) else np.asarray(tensor_indices).tolist()
        return module.event_seeds(base_seed, indices, event)
    with np.errstate(over="ignore"):
        words = (np.asarray(tensor_indices).astype(np.uint64) << np.uint64(32)) | np.uint64(event & 0xFFFFFFFFFFFFFFFF)
        mixed = np.uint64(splitmix64(base_seed & 0xFFFFFFFFFFFFFFFF)) ^ _splitmix64_array(words)
        return torch.from_numpy((_splitmix64_array(mixed) & np.uint64(MASK63)).astype(np.int64))
