"""Parameter shapes of the benchmark models, generated without torchvision or transformers.

``scale`` divides every width (channels, hidden size, vocabulary) and keeps the number of tensors,
so a scaled list still exercises what a long parameter list costs (per-tensor overhead, launches).
"""

from __future__ import annotations


def _w(width: int, scale: int) -> int:
    return max(1, width // scale)


def resnet50_shapes(scale: int = 1) -> list[tuple[int, ...]]:
    """The 161 parameter tensors of torchvision's ResNet-50 (25.6M parameters at ``scale=1``)."""
    stem = _w(64, scale)
    shapes: list[tuple[int, ...]] = [(stem, 3, 7, 7), (stem,), (stem,)]
    in_ch = stem
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        width = _w(width, scale)
        for block in range(blocks):
            out_ch = width * 4
            shapes += [(width, in_ch, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out_ch, width, 1, 1), (out_ch,), (out_ch,)]
            if block == 0:
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
            in_ch = out_ch
    classes = _w(1000, scale)
    shapes += [(classes, in_ch), (classes,)]
    return shapes


def gpt2_medium_shapes(scale: int = 1) -> list[tuple[int, ...]]:
    """The 292 parameter tensors of GPT-2 medium (355M parameters at ``scale=1``)."""
    d, layers, vocab, ctx = _w(1024, scale), 24, _w(50257, scale), _w(1024, scale)
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes
