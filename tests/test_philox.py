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


def test_stream_known_answer_zero_seed():
    # seed 0 (key (0, 0)): elements 0..3 take the four words of Random123's all-zero vector in order
    assert [int(w) for w in philox.randint4x(0, torch.tensor([0]))] == list(KAT[0][2])
    assert philox.randint(0, torch.arange(4)).tolist() == list(KAT[0][2])
    assert philox.randint(0, torch.tensor([2, 0, 3])).tolist() == [KAT[0][2][2], KAT[0][2][0], KAT[0][2][3]]
    # elements 4..7: counter (1, 0, 0, 0)
    quad1 = philox.philox4x32(tuple(torch.tensor([c]) for c in (1, 0, 0, 0)), (0, 0))
    assert philox.randint(0, torch.arange(4, 8)).tolist() == [int(w) for w in quad1]


try:
    import triton
    import triton.language as tl

    from sparsetrain.kernels.stream_random import UNIFORM_SCALE, block_uniforms, element_uniforms, philox_keys
except ImportError:  # the torch-only install: the Triton comparisons skip
    triton = None

if triton is not None:

    @triton.jit
    def _stream_kernel(
        index_ptr, ints_ptr, uniforms_ptr, block_ptr, ours_ptr, draws_ptr, block_draws_ptr, seed, n,
        BLOCK: tl.constexpr, WORDS: tl.constexpr,
    ):  # fmt: skip
        """Triton's own randint4x / rand4x at ``index >> 2``, word ``index & 3``; the fused kernel's
        Philox (per element, and 4-wide on the block [WORDS * 32 * p, WORDS * 32 * (p + 1)) of program
        p), as uniforms and as draws (uniforms / UNIFORM_SCALE up to one rounding)."""
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = idx < n
        index = tl.load(index_ptr + idx, mask=inside, other=0)
        i0, i1, i2, i3 = tl.randint4x(seed, index >> 2)
        u0, u1, u2, u3 = tl.rand4x(seed, index >> 2)
        lane = index & 3
        word = tl.where(lane == 0, i0, tl.where(lane == 1, i1, tl.where(lane == 2, i2, i3)))
        uniform = tl.where(lane == 0, u0, tl.where(lane == 1, u1, tl.where(lane == 2, u2, u3)))
        tl.store(ints_ptr + idx, word, mask=inside)
        tl.store(uniforms_ptr + idx, uniform, mask=inside)
        start = tl.program_id(0).to(tl.int64) * (WORDS * 32)
        rows = tl.arange(0, WORDS)[:, None] * 32 + tl.arange(0, 32)[None, :]
        keys = philox_keys(seed)
        tl.store(block_ptr + start + rows, block_uniforms(keys, start, WORDS))
        tl.store(block_draws_ptr + start + rows, block_uniforms(keys, start, WORDS, True))
        tl.store(ours_ptr + idx, element_uniforms(keys, index), mask=inside)
        tl.store(draws_ptr + idx, element_uniforms(keys, index, True), mask=inside)


def _triton_stream(seed: int, index: torch.Tensor) -> dict[str, torch.Tensor]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: interpreted
    names = ("uniforms", "ours", "draws")
    out = {name: torch.empty(index.numel(), dtype=torch.float32, device=device) for name in names}
    out["ints"] = torch.empty(index.numel(), dtype=torch.int32, device=device)
    out |= {name: torch.empty(4 * 256, dtype=torch.float32, device=device) for name in ("blocks", "block_draws")}
    _stream_kernel[(4,)](
        index.to(device), out["ints"], out["uniforms"], out["blocks"], out["ours"], out["draws"], out["block_draws"],
        seed, index.numel(), BLOCK=256, WORDS=8,
    )  # fmt: skip
    return {name: value.cpu() for name, value in out.items()}


@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 977, philox.event_seed(7, 3, 11)])
@pytest.mark.skipif(triton is None, reason="triton is not installed")
def test_stream_matches_triton_rand4x(seed):
    gen = torch.Generator().manual_seed(seed % 2**31)
    index = torch.cat(
        [
            torch.randint(0, 2**42, (500,), generator=gen),
            torch.tensor([3, 4, 2**34 - 1, 2**34, 2**34 + 1, 2**35 + 12345, 2**62 + 5]),  # counter carries into c1
        ]
    )
    out = _triton_stream(seed, index)
    assert torch.equal(out["ints"].to(torch.int64) & 0xFFFFFFFF, philox.randint(seed, index))
    assert torch.equal(out["uniforms"], philox.rand(seed, index))
    assert torch.equal(out["ours"], philox.rand(seed, index))  # the kernel's own Philox, bit for bit
    # the kernel's 4-wide block layout: element 32 r + c at [r, c]
    dense = philox.rand(seed, torch.arange(4 * 256))
    assert torch.equal(out["blocks"], dense)
    # draws: |float(int32 word)|, the uniform / UNIFORM_SCALE up to three fp32 roundings (the scale held
    # in fp32 among them) and one unit of the word (the uniform widens -x - 1 where the draw widens -x):
    # far inside the tie band (1e-6)
    scale = float(UNIFORM_SCALE.value if hasattr(UNIFORM_SCALE, "value") else UNIFORM_SCALE)
    for draws, uniforms in ((out["draws"], philox.rand(seed, index)), (out["block_draws"], dense)):
        torch.testing.assert_close(draws.double() * scale, uniforms.double(), rtol=2**-22, atol=2 * scale)


def test_dense_and_scattered_indices_agree():
    index = torch.arange(1001, 1401)  # dense: each counter once, then gathered
    scattered = philox.rand(5, torch.cat([index, torch.tensor([2**50])]))[:-1]  # sparse range: per element
    torch.testing.assert_close(philox.rand(5, index), scattered, rtol=0, atol=0)
    torch.testing.assert_close(philox.rand(5, index.view(20, 20)), scattered.view(20, 20), rtol=0, atol=0)


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
