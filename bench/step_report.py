"""GPU benchmark of the fused pruning step against the baselines of DESIGN.md, measured in one run.

    python bench/step_report.py --out bench/results            # all scenarios
    python bench/step_report.py --quick                         # smaller sizes, smoke run
    python bench/step_report.py --sweep                         # + launch shapes (words x warps)

Times are medians of ``triton.testing.do_bench`` (warm-up excluded). The device's copy ceiling is
measured in the same run (``dst.copy_(src)`` on 1 GiB, bytes read + written / time), and every
sparsetrain time is reported with its fraction of that ceiling at the bytes it must move
(fp32 SGD with momentum and a mask: 20.25 B/element; AdamW: 28.25 B/element). Results are written
as JSON and Markdown with the device name, torch and Triton versions, date and command line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import gpt2_medium_shapes, resnet50_shapes  # noqa: E402

import sparsetrain  # noqa: E402

LR, MOMENTUM, L2, TEMPERATURE = 0.01, 0.9, 1e-4, 1.0


def bench(fn, warmup=25, rep=100) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def copy_ceiling(device) -> float:
    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def make(shapes, device, dtype=torch.float32, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(s, device=device, dtype=dtype, generator=gen) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, dtype=dtype, generator=gen)
    return params


# ----------------------------------------------------------------------------------- baselines
def torch_fused(params, algo):
    opt = (
        torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, fused=True)
        if algo == "sgd"
        else torch.optim.AdamW(params, lr=LR, fused=True)
    )
    opt.step()
    return opt.step


def eager_pruning(params, algo):
    """Pruning the way users write it today: foreach L2, torch's fused step, then mask + sampling."""
    opt = (
        torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, fused=True)
        if algo == "sgd"
        else torch.optim.AdamW(params, lr=LR, fused=True)
    )
    alive = [torch.ones_like(p, dtype=torch.bool) for p in params]
    opt.step()

    def step():
        grads = [p.grad for p in params]
        torch._foreach_add_(grads, params, alpha=L2)
        opt.step()
        for p, a in zip(params, alive):
            scale = TEMPERATURE * p.abs().mean()
            q = torch.clamp(1e-3 * torch.exp(-p.abs() / scale), max=1.0)
            a &= torch.rand_like(p) >= q
            p.mul_(a)
            for buf in opt.state[p].values():
                if isinstance(buf, torch.Tensor) and buf.shape == p.shape:
                    buf.mul_(a)

    return step


def compiled_pruning(params, algo):
    """torch.compile of the same pruning step, SGD with momentum written functionally."""
    bufs = [torch.zeros_like(p) for p in params]
    alive = [torch.ones_like(p, dtype=torch.bool) for p in params]

    @torch.compile
    def step_fn(params, grads, bufs, alive):
        for p, g, b, a in zip(params, grads, bufs, alive):
            g = g + L2 * p
            b.mul_(MOMENTUM).add_(g)
            p.add_(b, alpha=-LR)
            scale = TEMPERATURE * p.abs().mean()
            q = torch.clamp(1e-3 * torch.exp(-p.abs() / scale), max=1.0)
            a &= torch.rand_like(p) >= q
            p.mul_(a)
            b.mul_(a)

    grads = [p.grad for p in params]
    step_fn(params, grads, bufs, alive)
    return lambda: step_fn(params, grads, bufs, alive)


def ours(params, algo, *, dead_filter_fraction=0.0, prune=True):
    """sparsetrain, triton backend: regularize + update + stochastic sampling + mask in one op call."""
    opt = (
        sparsetrain.optim.SGD(params, lr=LR, momentum=MOMENTUM, backend="triton")
        if algo == "sgd"
        else sparsetrain.optim.AdamW(params, lr=LR, backend="triton")
    )
    for p in params:
        rows = p.shape[0] if p.dim() > 1 else 1
        opt.enable_pruning(p, groups=rows)
        opt.set_coefs(p, l2=L2, temperature=TEMPERATURE, prune_count=1e-3 * p.numel())
        if dead_filter_fraction:
            alive = torch.ones(rows, dtype=torch.bool, device=p.device)
            alive[: int(rows * dead_filter_fraction)] = False
            opt.set_mask(p, alive[:, None].expand(rows, p.numel() // rows).reshape(p.shape))
    opt.step()  # statistics for the first sampling event, launch plan built

    def step():
        if prune:
            opt.schedule_pruning("stochastic")
        opt.step()

    return step


# ------------------------------------------------------------------------------------ scenarios
def scenarios(quick: bool):
    big = (2**24,) if quick else (2**28,)
    yield "one tensor, SGD momentum + L2 + sampling + mask", "sgd", [big], 20.25
    yield "ResNet-50 list (161 tensors), same step", "sgd", resnet50_shapes(), 20.25
    yield (
        "GPT-2-medium list (292 tensors), same step",
        "sgd",
        (gpt2_medium_shapes()[:40] if quick else gpt2_medium_shapes()),
        20.25,
    )
    yield "AdamW, one tensor, with sampling", "adamw", [big], 28.25


SWEEP_WORDS, SWEEP_WARPS = (16, 32, 64), (4, 8)  # 128 words spill registers at 4 warps (sm_90)


def sweep(device, quick: bool, ceiling: float, rows: list[dict], save) -> None:
    """The sparsetrain step under each launch shape (mask words per program x warps per program)."""
    from sparsetrain.backends import triton_backend

    big = (2**24,) if quick else (2**28,)
    cases = [
        ("one tensor, SGD", "sgd", [big], 20.25),
        ("ResNet-50 list, SGD", "sgd", resnet50_shapes(), 20.25),
        ("one tensor, AdamW", "adamw", [big], 28.25),
    ]
    defaults = triton_backend.configure()
    try:
        for words in SWEEP_WORDS:
            for warps in SWEEP_WARPS:
                triton_backend.configure(words=words, num_warps=warps)
                for name, algo, shapes, bytes_per_elem in cases:
                    ms = bench(ours(make(shapes, device), algo))
                    floor_ms = sum(math.prod(x) for x in shapes) * bytes_per_elem / ceiling * 1e3
                    rows.append(
                        {"case": name, "words": words, "num_warps": warps, "ms": ms, "of_ceiling": floor_ms / ms}
                    )
                    save(rows[-1])
                    torch.cuda.empty_cache()
    finally:
        triton_backend.configure(*defaults)


def run(args, save) -> dict:
    """Fill the report row by row; ``save(row)`` is called after each, so a cut-off run keeps its rows."""
    from sparsetrain.backends import triton_backend

    device = torch.device("cuda")
    report = {
        "device": torch.cuda.get_device_properties(device).name,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "launch_shape": dict(zip(("words", "num_warps"), triton_backend.configure())),
        "complete": False,
        "rows": [],
        "sweep": [],
    }
    ceiling = copy_ceiling(device)
    report["copy_ceiling_TBps"] = ceiling / 1e12
    rows = report["rows"]
    save(report, {"copy_ceiling_TBps": report["copy_ceiling_TBps"]})
    for name, algo, shapes, bytes_per_elem in scenarios(args.quick):
        numel = sum(math.prod(s) for s in shapes)
        row = {"scenario": name, "elements": numel}
        row["torch_fused_no_pruning_ms"] = bench(torch_fused(make(shapes, device), algo))
        row["eager_pruning_ms"] = bench(eager_pruning(make(shapes, device), algo), warmup=5, rep=20)
        if not args.skip_compile and algo == "sgd" and len(shapes) <= 200:
            row["compiled_pruning_ms"] = bench(compiled_pruning(make(shapes, device), algo), warmup=5, rep=20)
        row["sparsetrain_ms"] = bench(ours(make(shapes, device), algo))
        floor_ms = numel * bytes_per_elem / ceiling * 1e3
        row["floor_ms"] = floor_ms
        row["fraction_of_copy_ceiling"] = floor_ms / row["sparsetrain_ms"]
        row["speedup_vs_torch_fused"] = row["torch_fused_no_pruning_ms"] / row["sparsetrain_ms"]
        rows.append(row)
        save(report, row)
        torch.cuda.empty_cache()
    # structured: 90% of filters pruned vs the dense-mask fused step
    shape = (2**12, 2**12) if args.quick else (2**14, 2**14)
    dense = bench(ours(make([shape], device), "sgd"))
    sparse = bench(ours(make([shape], device), "sgd", dead_filter_fraction=0.9))
    rows.append(
        {
            "scenario": "90% of filters pruned vs dense fused step",
            "elements": math.prod(shape),
            "sparsetrain_dense_ms": dense,
            "sparsetrain_90pct_dead_ms": sparse,
            "ratio": sparse / dense,
        }
    )
    save(report, rows[-1])
    if args.sweep:
        sweep(device, args.quick, ceiling, report["sweep"], lambda row: save(report, row))
    report["complete"] = True
    return report


def markdown(report: dict) -> str:
    shape = report["launch_shape"]
    lines = [
        f"# Fused step benchmark: {report['device']}",
        "",
        f"torch {report['torch']}, triton {report['triton']}, {report['date']}; copy ceiling "
        f"{report.get('copy_ceiling_TBps', float('nan')):.2f} TB/s; launch shape {shape['words']} mask words x "
        f"{shape['num_warps']} warps; command: `{report['command']}`",
        *([] if report.get("complete", True) else ["", "**Incomplete run: the rows below are all that finished.**"]),
        "",
        "| scenario | torch fused, no pruning | eager pruning | torch.compile pruning | sparsetrain | floor | "
        "of ceiling |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "ratio" in r:
            continue
        fmt = lambda key: f"{r[key]:.3f} ms" if key in r else "-"  # noqa: E731
        lines.append(
            f"| {r['scenario']} | {fmt('torch_fused_no_pruning_ms')} | {fmt('eager_pruning_ms')} | "
            f"{fmt('compiled_pruning_ms')} | {fmt('sparsetrain_ms')} | {fmt('floor_ms')} | "
            f"{r['fraction_of_copy_ceiling']:.0%} |"
        )
    for r in report["rows"]:
        if "ratio" in r:
            lines += [
                "",
                f"{r['scenario']}: {r['sparsetrain_90pct_dead_ms']:.3f} ms vs {r['sparsetrain_dense_ms']:.3f} ms"
                f" = {r['ratio']:.2f}x",
            ]
    if report.get("sweep"):
        cases = list(dict.fromkeys(r["case"] for r in report["sweep"]))
        lines += ["", "Launch shapes (mask words per program x warps), sparsetrain step in ms (of ceiling):", ""]
        lines += ["| words | warps | " + " | ".join(cases) + " |", "|---|---|" + "---|" * len(cases)]
        shapes = list(dict.fromkeys((r["words"], r["num_warps"]) for r in report["sweep"]))
        for words, warps in shapes:
            cells = [
                f"{r['ms']:.3f} ({r['of_ceiling']:.0%})"
                for case in cases
                for r in report["sweep"]
                if r["case"] == case and (r["words"], r["num_warps"]) == (words, warps)
            ]
            lines.append(f"| {words} | {warps} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also time every launch shape (words x warps)")
    parser.add_argument("--words", type=int, help="mask words per program for the main table")
    parser.add_argument("--warps", type=int, help="warps per program for the main table")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("step_report needs a CUDA device; none is visible", file=sys.stderr)
        return 2
    from sparsetrain.backends import triton_backend

    triton_backend.configure(words=args.words, num_warps=args.warps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(report: dict, row: dict) -> None:
        print(json.dumps(row), flush=True)
        stem = f"step_{report['device'].replace(' ', '_')}_{report['date'][:10]}"
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
        (out / f"{stem}.md").write_text(markdown(report))

    report = run(args, save)
    save(report, {"complete": True})
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
