import pytest
import torch

from sparsetrain import masks


@pytest.mark.parametrize("numel", [1, 31, 32, 33, 64, 1000, 100_003])
def test_roundtrip(numel):
    gen = torch.Generator().manual_seed(numel)
    alive = torch.rand(numel, generator=gen) < 0.5
    words = masks.pack(alive)
    assert words.dtype == torch.int32 and words.numel() == (numel + 31) // 32
    assert torch.equal(masks.unpack(words, numel), alive)
    assert masks.alive_count(words) == int(alive.sum())


def test_bit_order_and_padding():
    alive = torch.zeros(33, dtype=torch.bool)
    alive[0] = alive[31] = alive[32] = True
    words = masks.pack(alive)
    assert words.tolist() == [1 | -(2**31), 1]  # LSB first; bit 31 makes word 0 negative
    assert masks.pack(torch.ones(33, dtype=torch.bool)).tolist() == [-1, 1]  # last word zero-padded


def test_shape_and_errors():
    alive = torch.rand(3, 5, 7) < 0.3
    assert torch.equal(masks.unpack(masks.pack(alive), alive.numel(), alive.shape), alive)
    with pytest.raises(TypeError, match="bool"):
        masks.pack(torch.ones(4))
    with pytest.raises(ValueError, match="cannot hold"):
        masks.unpack(torch.zeros(2, dtype=torch.int32), 100)
