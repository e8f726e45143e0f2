"""Timing, the device's copy ceiling and peak memory, the same way for every provider.

On CUDA, times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls)
or, without Triton, of CUDA events around each call. On CPU, ``time.perf_counter`` around each call
after warm-up calls, median of the repetitions (at least ``min_reps``, more while the time budget
lasts).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Budget:
    """How long one measurement may take: warm-up calls, repetitions and seconds (CPU)."""

    warmup: int = 1
    min_reps: int = 3
    max_reps: int = 30
    seconds: float = 1.0
    gpu_warmup_ms: int = 25
    gpu_rep_ms: int = 100


QUICK = Budget(warmup=0, min_reps=1, max_reps=3, seconds=0.02, gpu_warmup_ms=5, gpu_rep_ms=20)
DEFAULT = Budget()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, budget: Budget = DEFAULT) -> float:
    """Median time of one call of ``fn`` in milliseconds (warm-up excluded)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return _cuda_events_ms(fn, budget)
        return float(do_bench(fn, warmup=budget.gpu_warmup_ms, rep=budget.gpu_rep_ms, return_mode="median"))
    for _ in range(budget.warmup):
        fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < budget.min_reps or (len(times) < budget.max_reps and spent < budget.seconds):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
    return statistics.median(times) * 1e3


def _cuda_events_ms(fn: Callable[[], object], budget: Budget) -> float:
    for _ in range(max(budget.warmup, 3)):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(budget.min_reps, 20)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def timed_call(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call in seconds, device work included (compile times)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def copy_ceiling(device: torch.device, elements: int, budget: Budget = DEFAULT) -> float:
    """The device's copy bandwidth in bytes/s: ``dst.copy_(src)`` on ``elements`` fp32, read + written."""
    src = torch.ones(elements, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, budget)
    return 2 * elements * 4 / (ms * 1e-3)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Largest amount of memory ``fn`` holds at once beyond what was allocated before the call.

    CUDA: the caching allocator's peak statistic. CPU: the allocations and frees torch's profiler
    records (``profile_memory=True``), summed in order; a temporary allocated and freed inside one
    op is not seen there.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    held = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage  # an op's own allocations net of its frees; "[memory]": frees
        peak = max(peak, held)
    return int(peak)
