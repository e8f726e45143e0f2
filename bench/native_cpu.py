"""CPU timings of the native backend's fused step against torch.optim (foreach) and the torch reference.

A list of fp32 tensors (the first ResNet-50 shapes, as many as reach ``--elements``: 10M by default) takes,
per thread count:

* torch.optim.SGD(foreach=True), momentum 0.9 + weight decay, no pruning at all;
* the native SGD step with momentum + L2 + a 50%-sparse mask, no pruning event and no statistics (the
  step a pruning method takes away from its events);
* the same step computing the statistics StochasticMagnitude reads at its next event (the step
  before an event: alive count and the sampling kernel's sum), and computing all four statistics;
* the same step with a stochastic sampling event (Philox draws and the decision on every live weight)
  as the optimizer takes it between sparse events (it reads the previous step's statistics and
  computes none: ``stats_mask=0``); an event on every step, which also computes what the next event
  reads (alive count, sum |w|, kernel sum: ``StochasticMagnitude(interval=1)``'s set); and an event
  computing all four statistics;
* torch.optim.AdamW(foreach=True) against the native AdamW step (L2 + mask) in the same cases;
* the torch reference backend on the same SGD / AdamW steps (one measurement each: it is slow).

Median wall time of repeated steps after a warm-up. Prints a markdown report (machine, versions,
date, command); ``--out`` writes it to a file.

    python bench/native_cpu.py [--elements 10000000] [--threads 1 2] [--out bench/results/....md]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from sparsetrain import contract, masks, methods, philox
from sparsetrain.backends import module
from sparsetrain.benchmarks.shapes import resnet50_shapes


def _shapes(elements: int) -> list[tuple[int, ...]]:
    """The first ResNet-50 shapes whose elements add up to at least ``elements`` (all of them if they hold fewer)."""
    out, total = [], 0
    for shape in resnet50_shapes():
        if total >= elements:
            break
        out.append(shape)
        total += torch.Size(shape).numel()
    return out


def _inputs(shapes, algo: str):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    alive = [torch.rand(p.numel(), generator=gen) < 0.5 for p in params]
    for p, a in zip(params, alive):
        p.view(-1).mul_(a)
    n_states = 1 if algo == "sgd" else 2
    states = [[torch.zeros_like(p) for p in params] for _ in range(n_states)]
    stats, coefs = [], []
    for p, a in zip(params, alive):
        w = p.double().abs().view(-1)
        tm = 0.5 * float(w.sum()) / max(1, int(a.sum()))
        stats.append(
            torch.tensor([a.sum(), w.sum(), (torch.exp(-w / tm) * a).sum(), 0.1 * a.sum(), tm], dtype=torch.float64)
        )
        c = torch.zeros(contract.NUM_COEFS)
        c[contract.COEF_L2] = 1e-4
        c[contract.COEF_PRUNE_COUNT] = 0.01 * p.numel()
        c[contract.COEF_TEMPERATURE] = 0.5
        coefs.append(c)
    # one tensor whose rows are the tensors' statistics: each step that reads statistics starts from
    # these (a step overwrites what it computes and zeroes what it does not, so a step that leaves
    # sum |w| out would otherwise run its successors without the kernel scale a real run has)
    stats_all = torch.stack(stats)
    return dict(
        params=params,
        grads=grads,
        states=states,
        steps=[torch.tensor(5.0) for _ in params],
        mask_words=[masks.pack(a) for a in alive],
        stats_all=stats_all,
        stats_saved=stats_all.clone(),
        stats=list(stats_all.unbind(0)),
        tensor_coefs=coefs,
        seeds=torch.tensor([philox.event_seed(1, t, 3) for t in range(len(params))], dtype=torch.int64),
    )


def _fused(x, backend: str, algo: str, prune: str, stats: bool = True, stats_mask: int = contract.STATS_ALL) -> None:
    if stats:  # the statistics of the previous step, as a real run has them (one copy of a small tensor)
        x["stats_all"].copy_(x["stats_saved"])
    common = dict(
        mask_words=x["mask_words"],
        stats=x["stats"] if stats else [],
        stats_mask=stats_mask,
        tensor_coefs=x["tensor_coefs"],
        group_coefs=[],
        group_inner=[],
        shard_offsets=[],
        seeds=x["seeds"],
        found_inf=None,
        lr=0.01,
        lr_tensor=None,
        prune=prune,
        regularize=True,
        l1_proximal=True,
    )
    mod = module(backend)
    if algo == "sgd":
        mod.sgd_step(
            x["params"], x["grads"], x["states"][0], x["steps"], weight_decay=0.0, momentum=0.9, dampening=0.0,
            nesterov=False, maximize=False, **common,
        )  # fmt: skip
    else:
        mod.adam_step(
            x["params"], x["grads"], x["states"][0], x["states"][1], [], x["steps"], beta1=0.9, beta2=0.999,
            eps=1e-8, weight_decay=1e-2, decoupled=True, amsgrad=False, maximize=False, **common,
        )  # fmt: skip


def _computed(method, step: int) -> int:
    """The statistics the optimizer step ``step`` computes under ``method`` (what its next step reads)."""
    return method.stats_read(step + 1)


_SPARSE_EVENTS = methods.StochasticMagnitude(0.5, start=10, end=100, interval=10)
_EVERY_STEP = methods.StochasticMagnitude(0.5, start=10, end=100, interval=1)
BEFORE_EVENT = _computed(_SPARSE_EVENTS, 19)  # alive, kernel sum
EVENT = _computed(_SPARSE_EVENTS, 20)  # none
EVENT_EVERY_STEP = _computed(_EVERY_STEP, 20)  # alive, sum |w|, kernel sum
# names without "|": they label rows of a markdown table
NAMES = {contract.STATS_ALIVE: "alive", contract.STATS_SUM_ABS_W: "sum abs(w)", contract.STATS_SUM_KERNEL: "kernel sum"}
NAMES[contract.STATS_SUM_ABS_G] = "sum abs(g)"


def _named(bits: int) -> str:
    return ", ".join(name for bit, name in NAMES.items() if bits & bit) or "none"


CASES = (  # prune mode, statistics read, statistics computed (stats_mask), label
    ("none", False, contract.STATS_NONE, "non-event"),
    ("none", True, BEFORE_EVENT, f"step before an event, computes {_named(BEFORE_EVENT)}"),
    ("none", True, contract.STATS_ALL, "non-event, computes all statistics"),
    ("stochastic", True, EVENT, f"sampling event, computes {_named(EVENT)}"),
    ("stochastic", True, EVENT_EVERY_STEP, f"sampling event on every step, computes {_named(EVENT_EVERY_STEP)}"),
    ("stochastic", True, contract.STATS_ALL, "sampling event, computes all statistics"),
)
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
_clock = time.perf_counter


def _time(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = _clock()
        fn()
        samples.append(_clock() - t0)
    return statistics.median(samples) * 1e3


def _torch_optim(shapes, name: str):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 0.1
    if name == "SGD":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4, foreach=True)
    return torch.optim.AdamW(params, lr=0.01, weight_decay=1e-2, foreach=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=10_000_000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or the process's CPU time (all threads; less sensitive to other load on a shared machine)",
    )
    args = parser.parse_args()
    global _clock
    _clock = CLOCKS[args.clock]
    shapes = _shapes(args.elements)
    total = sum(torch.Size(s).numel() for s in shapes)
    base = {algo: _inputs(shapes, algo) for algo in ("sgd", "adam")}
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        row = {"threads": threads}
        sgd = _torch_optim(shapes, "SGD")
        row["torch.optim.SGD foreach"] = _time(sgd.step, args.reps)
        adamw = _torch_optim(shapes, "AdamW")
        row["torch.optim.AdamW foreach"] = _time(adamw.step, args.reps)
        for algo, label in (("sgd", "SGD"), ("adam", "AdamW")):
            for prune, stats, write, kind in CASES:
                x = copy.deepcopy(base[algo])
                row[f"native {label} {kind}"] = _time(
                    lambda x=x, a=algo, p=prune, st=stats, w=write: _fused(x, "native", a, p, st, w), args.reps
                )
                if args.reference:
                    x = copy.deepcopy(base[algo])
                    row[f"torch reference {label} {kind}"] = _time(
                        lambda x=x, a=algo, p=prune, st=stats, w=write: _fused(x, "torch", a, p, st, w), 1, warmup=0
                    )
        rows.append(row)
    keys = list(rows[0].keys())[1:]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Native backend on CPU: fused step vs torch.optim (foreach)",
        "",
        f"Machine: {_cpu_name()}, {torch.get_num_threads()} threads available to torch; "
        f"Python {platform.python_version()}, torch {torch.__version__}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {commit or 'n/a'}",
        f"Command: python bench/native_cpu.py {' '.join(sys.argv[1:])}".rstrip(),
        "",
        f"{len(shapes)} fp32 tensors (the first ResNet-50 shapes reaching {args.elements / 1e6:g}M elements), "
        f"{total / 1e6:.2f}M elements; masks 50% alive; "
        f"median of {args.reps} steps after 2 warm-up steps (torch reference: one step). Milliseconds of "
        f"{'wall time' if args.clock == 'wall' else 'process CPU time (all threads)'} per step.",
        "",
        "| case | " + " | ".join(f"{r['threads']} thread{'s' if r['threads'] > 1 else ''}" for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(f"{r[key]:.1f}" for r in rows) + " |")
    lines.append("")
    for r in rows:
        t = r["threads"]
        parts = []
        for label, optim in (("SGD", "torch.optim.SGD foreach"), ("AdamW", "torch.optim.AdamW foreach")):
            plain, before, _, event, every, event_all = (r[f"native {label} {case[3]}"] for case in CASES)
            parts.append(
                f"native {label} non-event / {optim.split()[0]} = {plain / r[optim]:.2f}; per non-event {label} step: "
                f"step before an event {before / plain:.2f}, event {event / plain:.2f}, event on every step "
                f"{every / plain:.2f}, event computing all statistics {event_all / plain:.2f}"
            )
        lines.append(f"- {t} thread(s): " + "; ".join(parts))
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
