"""GPU benchmark of the fused pruning step against the baselines users have today (torch's fused
optimizers, the eager pruning step, torch.compile of it), measured in one run.

    python bench/step_report.py --out bench/results            # all scenarios
    python bench/step_report.py --quick                         # smaller sizes, smoke run
    python bench/step_report.py --sweep                         # + launch shapes (words, warps, blocks)
    python bench/step_report.py --sweep-only                    # launch shapes only

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

import sparsetrain  # noqa: F401
from sparsetrain.benchmarks import timing  # noqa: E402
from sparsetrain.benchmarks.shapes import gpt2_medium_shapes, resnet50_shapes  # noqa: E402
from sparsetrain.benchmarks.steps import (  # noqa: E402
    compiled_pruning_step,
    eager_pruning_step,
    make,
    make_masks,
    sparsetrain_step,
    torch_optim_step,
)

# bytes each element must move: fp32 SGD with momentum and a mask, AdamW; a dead element only its mask bit
SGD_BYTES, ADAMW_BYTES, DEAD_BYTES = 20.25, 28.25, 1 / 8


def tensor_shapes(quick: bool) -> tuple[tuple[int], tuple[int, int]]:
    """The single-tensor cases' shapes: a flat 268M tensor and a 16384 x 16384 weight (16M each
    with ``quick``)."""
    return ((2**24,), (2**12, 2**12)) if quick else ((2**28,), (2**14, 2**14))


def bench(fn, warmup=25, rep=100) -> float:
    budget = timing.Budget(gpu_warmup_ms=warmup, gpu_rep_ms=rep)
    return timing.time_ms(fn, torch.device("cuda"), budget)


def copy_ceiling(device) -> float:
    return timing.copy_ceiling(device, 2**28)


def ours(params, algo, *, dead_filter_fraction=0.0, dead_fraction=0.0):
    """sparsetrain, triton backend: regularize + update + stochastic sampling + mask in one op call.

    ``dead_filter_fraction`` prunes that fraction of each weight's rows (filters, chosen at random)
    before timing, ``dead_fraction`` that fraction of its elements at random (unstructured)."""
    if dead_filter_fraction:
        masks = make_masks(params, dead_filter_fraction, "structured")
    else:
        masks = make_masks(params, dead_fraction, "unstructured")
    return sparsetrain_step(params, algo, masks, backend="triton")


# ------------------------------------------------------------------------------------ scenarios
def scenarios(quick: bool):
    big, _ = tensor_shapes(quick)
    yield "one tensor, SGD momentum + L2 + sampling + mask", "sgd", [big], SGD_BYTES
    yield "ResNet-50 list (161 tensors), same step", "sgd", resnet50_shapes(), SGD_BYTES
    yield (
        "GPT-2-medium list (292 tensors), same step",
        "sgd",
        (gpt2_medium_shapes()[:40] if quick else gpt2_medium_shapes()),
        SGD_BYTES,
    )
    yield "AdamW, one tensor, with sampling", "adamw", [big], ADAMW_BYTES


SWEEP_WORDS, SWEEP_WARPS = (16, 32, 64), (4, 8)  # 128 words spill registers at 4 warps (sm_90)
SWEEP_BLOCKS = (1, 2, 4, 8, 16)


def sweep(device, quick: bool, ceiling: float, rows: list[dict], save) -> None:
    """The sparsetrain step under each launch shape: mask words per block x warps (at the default
    blocks per program), then blocks per program (at the default words and warps)."""
    from sparsetrain.backends import triton_backend

    big, square = tensor_shapes(quick)
    cases = [
        ("one tensor, SGD", "sgd", [big], SGD_BYTES, 0.0),
        ("ResNet-50 list, SGD", "sgd", resnet50_shapes(), SGD_BYTES, 0.0),
        ("one tensor, AdamW", "adamw", [big], ADAMW_BYTES, 0.0),
        ("90% of filters dead, SGD", "sgd", [square], 0.1 * SGD_BYTES + 0.9 * DEAD_BYTES, 0.9),
    ]
    defaults = triton_backend.configure()
    words0, warps0, blocks0 = defaults
    shapes = [(w, n, blocks0) for w in SWEEP_WORDS for n in SWEEP_WARPS]
    shapes += [(words0, warps0, b) for b in SWEEP_BLOCKS if b != blocks0]
    try:
        for words, warps, blocks in shapes:
            triton_backend.configure(words, warps, blocks)
            for name, algo, case_shapes, bytes_per_elem, dead in cases:
                ms = bench(ours(make(case_shapes, device), algo, dead_filter_fraction=dead))
                floor_ms = sum(math.prod(x) for x in case_shapes) * bytes_per_elem / ceiling * 1e3
                rows.append(
                    {"case": name, "words": words, "num_warps": warps, "blocks": blocks, "ms": ms,
                     "of_ceiling": floor_ms / ms}
                )  # fmt: skip
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
        "launch_shape": dict(zip(("words", "num_warps", "blocks"), triton_backend.configure())),
        "complete": False,
        "rows": [],
        "sweep": [],
    }
    ceiling = copy_ceiling(device)
    report["copy_ceiling_TBps"] = ceiling / 1e12
    rows = report["rows"]
    save(report, {"copy_ceiling_TBps": report["copy_ceiling_TBps"]})
    if args.sweep_only:
        sweep(device, args.quick, ceiling, report["sweep"], lambda row: save(report, row))
        report["complete"] = True
        return report
    for name, algo, shapes, bytes_per_elem in scenarios(args.quick):
        numel = sum(math.prod(s) for s in shapes)
        row = {"scenario": name, "elements": numel}
        row["torch_fused_no_pruning_ms"] = bench(torch_optim_step(make(shapes, device), algo))
        row["eager_pruning_ms"] = bench(eager_pruning_step(make(shapes, device), algo), warmup=5, rep=20)
        if not args.skip_compile and algo == "sgd" and len(shapes) <= 200:
            row["compiled_pruning_ms"] = bench(compiled_pruning_step(make(shapes, device), algo), warmup=5, rep=20)
        row["sparsetrain_ms"] = bench(ours(make(shapes, device), algo))
        floor_ms = numel * bytes_per_elem / ceiling * 1e3
        row["floor_ms"] = floor_ms
        row["fraction_of_copy_ceiling"] = floor_ms / row["sparsetrain_ms"]
        row["speedup_vs_torch_fused"] = row["torch_fused_no_pruning_ms"] / row["sparsetrain_ms"]
        rows.append(row)
        save(report, row)
        torch.cuda.empty_cache()
    # structured: 90% of filters pruned vs the dense-mask fused step
    _, shape = tensor_shapes(args.quick)
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
    # unstructured: 95% of the elements dead at random, so nearly every block is live but sparse
    unstructured = bench(ours(make([shape], device), "sgd", dead_fraction=0.95))
    rows.append(
        {
            "scenario": "95% of weights dead (unstructured) vs dense fused step",
            "elements": math.prod(shape),
            "sparsetrain_dense_ms": dense,
            "sparsetrain_95pct_unstructured_ms": unstructured,
            "ratio": unstructured / dense,
        }
    )
    save(report, rows[-1])
    if args.sweep:
        sweep(device, args.quick, ceiling, report["sweep"], lambda row: save(report, row))
    report["complete"] = True
    return report


def _warps(num_warps: int) -> str:
    return str(num_warps) if num_warps else "4 (SGD) / 8 (AdamW)"


def markdown(report: dict) -> str:
    shape = report["launch_shape"]
    lines = [
        f"# Fused step benchmark: {report['device']}",
        "",
        f"torch {report['torch']}, triton {report['triton']}, {report['date']}; copy ceiling "
        f"{report.get('copy_ceiling_TBps', float('nan')):.2f} TB/s; launch shape: blocks of {shape['words']} mask "
        f"words, {shape['blocks']} blocks per program, {_warps(shape['num_warps'])} warps; "
        f"command: `{report['command']}`",
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
            sparse_ms = next(v for k, v in r.items() if k.startswith("sparsetrain_") and k != "sparsetrain_dense_ms")
            lines += [
                "",
                f"{r['scenario']}: {sparse_ms:.3f} ms vs {r['sparsetrain_dense_ms']:.3f} ms = {r['ratio']:.2f}x",
            ]
    if report.get("sweep"):
        cases = list(dict.fromkeys(r["case"] for r in report["sweep"]))
        lines += [
            "",
            "Launch shapes, sparsetrain step in ms (fraction of the copy ceiling at the bytes the case must move):",
            "",
        ]
        lines += ["| words | warps | blocks | " + " | ".join(cases) + " |", "|---|---|---|" + "---|" * len(cases)]
        key = lambda r: (r["words"], r["num_warps"], r.get("blocks", 1))  # noqa: E731
        for shape_key in dict.fromkeys(key(r) for r in report["sweep"]):
            cells = {
                r["case"]: f"{r['ms']:.3f} ({r['of_ceiling']:.0%})" for r in report["sweep"] if key(r) == shape_key
            }
            words, warps, blocks = shape_key
            lines.append(
                f"| {words} | {_warps(warps)} | {blocks} | " + " | ".join(cells.get(c, "-") for c in cases) + " |"
            )
        lines.append("")
        for case in cases:
            best = min((r for r in report["sweep"] if r["case"] == case), key=lambda r: r["ms"])
            lines.append(
                f"- fastest for {case}: {best['words']} words, {_warps(best['num_warps'])} warps, "
                f"{best.get('blocks', 1)} blocks per program: {best['ms']:.3f} ms ({best['of_ceiling']:.0%})"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also time the launch shapes (words, warps, blocks)")
    parser.add_argument("--sweep-only", action="store_true", help="time the launch shapes only")
    parser.add_argument("--words", type=int, help="mask words per program for the main table")
    parser.add_argument("--warps", type=int, help="warps per program for the main table")
    parser.add_argument("--blocks", type=int, help="blocks per program for the main table")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("step_report needs a CUDA device; none is visible", file=sys.stderr)
        return 2
    from sparsetrain.backends import triton_backend

    triton_backend.configure(words=args.words, num_warps=args.warps, blocks=args.blocks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(report: dict, row: dict) -> None:
        print(json.dumps(row), flush=True)
        kind = "sweep" if args.sweep_only else "step"
        stem = f"{kind}_{report['device'].replace(' ', '_')}_{report['date'][:10]}"
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
        (out / f"{stem}.md").write_text(markdown(report))

    report = run(args, save)
    save(report, {"complete": True})
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
