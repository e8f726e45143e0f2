"""The torch Philox reproduces Random123's known answers and triton.language.random bit for bit."""

import numpy as np
import pytest
import torch

from sparsetrain import philox

# Random123 kat_vectors, philox4x32 with 10 rounds: counter, key, expected output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answers(counter, key, expected):
    words = philox.philox4x32(tuple(torch.tensor([c]) for c in counter), key)
    assert [int(w) for w in words] == list(expected)


def _triton_rand(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(offsets_ptr, ints_ptr, uniforms_ptr, seed, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = idx < n
        offs = tl.load(offsets_ptr + idx, mask=inside, other=0)
        tl.store(ints_ptr + idx, tl.randint(seed, offs), mask=inside)
        tl.store(uniforms_ptr + idx, tl.rand(seed, offs), mask=inside)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: interpreted
    ints = torch.empty(offsets.numel(), dtype=torch.int32, device=device)
    uniforms = torch.empty(offsets.numel(), dtype=torch.float32, device=device)
    grid = (triton.cdiv(offsets.numel(), 256),)
    kernel[grid](offsets.to(device), ints, uniforms, seed, offsets.numel(), BLOCK=256)
    return ints.cpu(), uniforms.cpu()


@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 977, philox.event_seed(7, 3, 11)])
def test_matches_triton(seed):
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(seed % 2**31)
    offsets = torch.cat(
        [
            torch.arange(300, dtype=torch.int64),
            torch.randint(0, 2**40, (300,), generator=gen),
            torch.tensor([2**32 - 1, 2**32, 2**32 + 1, 2**33 + 12345, 2**62 + 5]),
        ]
    )
    ints, uniforms = _triton_rand(seed, offsets)
    expected_ints = philox.randint(seed, offsets)
    assert torch.equal(ints.to(torch.int64) & 0xFFFFFFFF, expected_ints)
    assert torch.equal(uniforms, philox.rand(seed, offsets))


def test_uniform_range_and_mean():
    u = philox.rand(99, torch.arange(200_000))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    # mean of 2e5 uniforms: standard error 6.5e-4; 5 sigma bound
    assert abs(float(u.double().mean()) - 0.5) < 5 * (1 / 12) ** 0.5 / 200_000**0.5


def test_event_seed_is_63_bit_and_distinct():
    seeds = {philox.event_seed(1, t, e) for t in range(20) for e in range(20)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)
    assert philox.event_seed(1, 0, 0) != philox.event_seed(2, 0, 0)


@pytest.mark.parametrize("base_seed", [0, 1, 2**62 + 12345, 2**64 - 1])
def test_vectorized_event_seeds_equal_the_scalar_ones(base_seed):
    indices = np.array([0, 1, 2, 160, 291, 2**20 + 3, 2**31 - 1], dtype=np.int64)
    for event in (0, 1, 7, 2**31 + 5, 2**32 - 1):
        expected = [philox.event_seed(base_seed, int(t), event) for t in indices]
        assert philox.event_seeds(base_seed, indices, event).tolist() == expected
