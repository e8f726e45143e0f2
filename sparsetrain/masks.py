"""Bit-packed masks: int32 words, bit ``i % 32`` of word ``i // 32``, least significant bit first.

The last word is zero-padded. One bit per weight: 1 = alive, 0 = pruned.
"""

from __future__ import annotations

import torch

_BIT_VALUES = torch.tensor([1 << b for b in range(32)], dtype=torch.int64)


def num_words(numel: int) -> int:
    """Number of int32 words holding ``numel`` mask bits."""
    return (numel + 31) // 32


def pack(alive: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (any shape, flattened in C order) into int32 words on the same device."""
    if alive.dtype != torch.bool:
        raise TypeError(f"pack expects a bool tensor, got {alive.dtype}")
    flat = alive.reshape(-1)
    padded = torch.zeros(num_words(flat.numel()) * 32, dtype=torch.int64, device=flat.device)
    padded[: flat.numel()] = flat.to(torch.int64)
    words = (padded.view(-1, 32) * _BIT_VALUES.to(flat.device)).sum(dim=1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack(mask_words: torch.Tensor, numel: int, shape: torch.Size | tuple[int, ...] | None = None) -> torch.Tensor:
    """Unpack int32 words into a bool tensor of ``numel`` elements (reshaped to ``shape`` if given)."""
    if mask_words.dtype != torch.int32:
        raise TypeError(f"unpack expects int32 mask words, got {mask_words.dtype}")
    if mask_words.numel() != num_words(numel):
        raise ValueError(f"{mask_words.numel()} mask words cannot hold exactly {numel} bits")
    words = mask_words.to(torch.int64) & 0xFFFFFFFF
    bits = (words[:, None] >> torch.arange(32, device=words.device)) & 1
    alive = bits.reshape(-1)[:numel].to(torch.bool)
    return alive.reshape(shape) if shape is not None else alive


def full(numel: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Mask words with every one of ``numel`` bits alive (padding bits zero)."""
    return pack(torch.ones(numel, dtype=torch.bool, device=device))


def alive_count(mask_words: torch.Tensor) -> int:
    """Number of set bits (host sync)."""
    words = mask_words.to(torch.int64) & 0xFFFFFFFF
    bits = (words[:, None] >> torch.arange(32, device=words.device)) & 1
    return int(bits.sum())
