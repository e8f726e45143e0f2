"""pytest-benchmark suite: the kernel cases of ``sparsetrain bench``, one test per case and provider.

Not collected by the default test command (``testpaths`` is ``tests``). Run with

    python -m pytest -p no:cacheprovider -o addopts="" bench/test_benchmark_kernels.py --benchmark-only

``SPARSETRAIN_BENCH_SIZE`` (quick, cpu, full) and ``SPARSETRAIN_BENCH_MATRIX`` (quick, reduced, full)
choose the cases; the defaults are those of ``sparsetrain bench`` (``--quick`` sizes on a CPU).
Each test records the case's floor (its bytes at the device's copy ceiling) in ``extra_info``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from sparsetrain.benchmarks import kernels, steps, timing

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_size, _matrix = kernels.defaults(DEVICE, quick=DEVICE.type != "cuda")
SIZE = os.environ.get("SPARSETRAIN_BENCH_SIZE", _size)
MATRIX = os.environ.get("SPARSETRAIN_BENCH_MATRIX", _matrix if SIZE == _size else kernels.defaults(DEVICE, False)[1])
PROVIDERS, _ = kernels.providers(DEVICE)
CASES = list(kernels.cases(SIZE, MATRIX))


@pytest.fixture(scope="session")
def ceiling() -> float:
    return timing.copy_ceiling(DEVICE, {"quick": 2**22, "cpu": 2**26, "full": 2**28}[SIZE])


def _case_id(case: kernels.Case) -> str:
    sparsity = "dense" if not case.sparsity else f"{case.sparsity:.0%}-{case.structure}"
    return f"{case.model.split(',')[0].replace(' ', '_')}-{case.algo}-{case.dtype}-{sparsity}"


@pytest.mark.parametrize("provider", PROVIDERS, ids=[p.name for p in PROVIDERS])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_step(benchmark, case: kernels.Case, provider: kernels.Provider, ceiling: float) -> None:
    why_not = kernels.compile_skip(case, SIZE, DEVICE) if provider.name == "compiled" else None
    if why_not:
        pytest.skip(why_not)
    params = steps.make(case.shapes, DEVICE, kernels.DTYPES[case.dtype])
    masks = steps.make_masks(params, case.sparsity, case.structure)
    dead = 0.0 if masks is None else 1 - sum(int(m.sum()) for m in masks) / sum(p.numel() for p in params)
    step = provider.build(params, case.algo, masks)

    def call() -> None:
        step()
        timing.synchronize(DEVICE)

    benchmark.pedantic(call, rounds=5 if SIZE == "quick" else 20, warmup_rounds=2, iterations=1)
    elements = sum(math.prod(s) for s in case.shapes)
    floor_ms = elements * kernels.bytes_per_element(case.algo, case.dtype, dead) / ceiling * 1e3
    benchmark.extra_info.update(elements=elements, floor_ms=floor_ms, device=str(DEVICE), dead_fraction=dead)
