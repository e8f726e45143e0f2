"""Host-side cost of one optimizer step, kernel launches stubbed out (runs on CPU, no GPU needed).

    python bench/host_overhead.py [--python-scans]

``--python-scans``: measure with the Python fallbacks of :mod:`sparsetrain.scan` (what an install
without the native extension runs) instead of the extension's one-pass C++ scans.

Measures the Python work ``opt.step()`` does per step for the ResNet-50 and GPT-2-medium parameter
lists with the triton backend's plan cache warm, and ``StochasticMagnitude.before_step`` at an
event (the prune-count calibration of every tensor), alone and in front of the step it schedules:
what remains between the user's call and the two kernel launches. On a GPU this overlaps the
previous step's kernels; it bounds the step time from below when the GPU work is shorter.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import types

os.environ.setdefault("TRITON_INTERPRET", "1")
import torch  # noqa: E402

import sparsetrain  # noqa: E402
from sparsetrain import scan  # noqa: E402
from sparsetrain.backends import triton_backend  # noqa: E402
from sparsetrain.benchmarks.shapes import gpt2_medium_shapes, resnet50_shapes  # noqa: E402
from sparsetrain.kernels import fused_step  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


ROUNDS, STEPS = 7, 200


def _rounds(call) -> tuple[float, float]:
    """Microseconds per call: the median and the best of ROUNDS rounds of STEPS calls each (a round's mean)."""
    per_round = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(STEPS):
            call()
        per_round.append((time.perf_counter() - start) / STEPS * 1e6)
    return statistics.median(per_round), min(per_round)


def main() -> None:
    if "--python-scans" in sys.argv[1:]:
        scan.native = lambda: None
    print(f"list scans: {'C++ (sparsetrain._C)' if scan.native() is not None else 'Python fallbacks'}")
    stub = types.SimpleNamespace(**{k: getattr(fused_step, k) for k in dir(fused_step) if k.isupper()})
    stub.fused_step_kernel = stub.finish_step_kernel = stub.reduce_partials_kernel = _NoLaunch()
    triton_backend._kernels = lambda: stub
    for name, shapes in (("ResNet-50", resnet50_shapes()), ("GPT-2-medium", gpt2_medium_shapes())):
        # host cost does not depend on sizes: tensors above 4M elements are stood in for by empty ones
        params = [torch.empty(s) if torch.Size(s).numel() < 2**22 else torch.empty(0) for s in shapes]
        for p in params:
            p.grad = torch.empty_like(p)
        opt = sparsetrain.optim.SGD(params, lr=0.1, momentum=0.9, backend="triton")
        for p in params:
            opt.enable_pruning(p)
            opt.set_coefs(p, l2=1e-4)
        for events in (False, True):  # plain steps, then a stochastic pruning event every step
            step = (lambda: (opt.schedule_pruning("stochastic"), opt.step())) if events else opt.step
            for _ in range(5):
                step()
            median, best = _rounds(step)
            what = "with a sampling event every step" if events else "plain step"
            print(f"{name}: {len(params)} tensors, {what}: {median:.0f} us (best round {best:.0f} us)")
        # StochasticMagnitude's calibration at an event (before the step): prune counts of every tensor
        method = sparsetrain.methods.StochasticMagnitude(0.8, start=1, end=10**6, interval=1)
        targets = [types.SimpleNamespace(param=p, ratio=0.8) for p in params]
        pruner = types.SimpleNamespace(
            targets=targets,
            optimizer=opt,
            stats=lambda t: opt.state[t.param]["stats"],
            coefs=lambda t: opt.state[t.param]["coefs"],
            sync=None,
        )
        for _ in range(5):
            method.before_step(pruner, 10)
        median, best = _rounds(lambda: method.before_step(pruner, 10))
        print(f"{name}: StochasticMagnitude.before_step at an event: {median:.0f} us (best round {best:.0f} us)")
        # the whole host side of an event: the calibration, then the step it schedules
        median, best = _rounds(lambda: (method.before_step(pruner, 10), opt.step()))
        print(f"{name}: event step with before_step in front: {median:.0f} us (best round {best:.0f} us)")


if __name__ == "__main__":
    main()
