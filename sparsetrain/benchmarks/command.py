"""``sparsetrain bench``: the kernel benchmark (default) or the end-to-end benchmark (``e2e``).

    sparsetrain bench                         # kernel benchmark on whatever device is present
    sparsetrain bench --quick                 # small sizes: seconds on a CPU (CI)
    sparsetrain bench e2e --plot e2e.png      # training steps of a GPT-2- and a ResNet-50-shaped model
    sparsetrain bench shrink --out bench/results  # training step before / after shrinking half the channels
    sparsetrain bench --out bench/results     # json + md + png named after the device and the date

The Markdown report goes to stdout (and ``--md``), the full results to ``--json``, a bar chart (or
the loss curves) to ``--plot`` (needs matplotlib: ``pip install 'sparsetrain[methods]'``).
"""

from __future__ import annotations

import argparse
import re
from typing import Any

KINDS = ("kernels", "e2e", "shrink")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options (imports nothing heavy)."""
    from ..cli import count

    parser.add_argument("what", nargs="?", choices=KINDS, default="kernels", help="kernels (default), e2e or shrink")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repetitions (CI on a small CPU)")
    parser.add_argument(
        "--size",
        choices=("quick", "cpu", "full"),
        help="quick, cpu or full (default: full on a GPU, cpu on a CPU; quick with --quick)",
    )
    parser.add_argument(
        "--matrix",
        choices=("quick", "reduced", "full"),
        help="kernels: which cases (default: full on a GPU, reduced on a CPU, quick with --quick)",
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when visible)")
    parser.add_argument("--providers", help="kernels: comma-separated providers to run (default: all usable here)")
    parser.add_argument("--models", help="comma-separated substrings of the model names to keep")
    parser.add_argument("--modes", help="e2e: comma-separated modes to run (default: all)")
    parser.add_argument(
        "--compile-all",
        action="store_true",
        help="kernels: compile every case (default: fp32 lists of at most 200 tensors)",
    )
    parser.add_argument("--no-select", action="store_true", help="kernels: skip the global-threshold table")
    parser.add_argument("--steps", type=count(1), help="e2e: timed steps per mode (default 2 quick, 20 cpu, 30 full)")
    parser.add_argument("--warmup", type=count(0), help="e2e: untimed steps first (default 1 quick, 3 otherwise)")
    parser.add_argument("--json", metavar="PATH", help="write the full results as JSON")
    parser.add_argument("--md", metavar="PATH", help="write the Markdown report")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG chart (matplotlib)")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="write <kind>_<device>_<date>.json/.md/.png into DIR (instead of --json/--md/--plot)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")  # fmt: skip


def _list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: only cpu and cuda are benchmarked")
    return device


def run(args: argparse.Namespace, command: str) -> int:
    """Run the benchmark ``args`` describe; ``command`` is recorded in the report."""
    from . import e2e, kernels, shrink
    from . import report as rep

    if args.plot or args.out:
        rep.require_matplotlib()
    device = _device(args.device)
    size, matrix = kernels.defaults(device, args.quick)
    size, matrix = args.size or size, args.matrix or matrix
    paths: dict[str, str | None] = {"json": args.json, "md": args.md, "plot": args.plot}
    module: Any = {"kernels": kernels, "e2e": e2e, "shrink": shrink}[args.what]

    def save(report: dict[str, Any]) -> None:
        if args.out:
            device_tag = re.sub(r"[^A-Za-z0-9]+", "_", report["device"].split(",")[0]).strip("_")
            stem = f"{args.out}/{args.what}_{device_tag}_{size}_{report['date'][:10]}"
            paths.update(json=f"{stem}.json", md=f"{stem}.md", plot=f"{stem}.png")
        rep.write(report, module.markdown(report), json_path=paths["json"], md_path=paths["md"])

    progress = not args.no_progress
    if args.what == "kernels":
        report = kernels.run(device, size=size, matrix=matrix, command=command, provider_names=_list(args.providers),
                             model_filter=_list(args.models), compile_all=args.compile_all, select=not args.no_select,
                             progress=progress, save=save)  # fmt: skip
    elif args.what == "shrink":
        steps = args.steps if args.steps is not None else {"quick": 2, "cpu": 20, "full": 30}[size]
        warmup = args.warmup if args.warmup is not None else (1 if size == "quick" else 3)
        report = shrink.run(device, size=size, steps=steps, warmup=warmup, command=command,
                            model_filter=_list(args.models), progress=progress, save=save)  # fmt: skip
    else:
        steps = args.steps if args.steps is not None else {"quick": 2, "cpu": 20, "full": 30}[size]
        warmup = args.warmup if args.warmup is not None else (1 if size == "quick" else 3)
        if steps < 1 or warmup < 0:
            raise SystemExit(f"need --steps >= 1 and --warmup >= 0, got {steps} and {warmup}")
        report = e2e.run(device, size=size, steps=steps, warmup=warmup, command=command, modes=_list(args.modes),
                         model_filter=_list(args.models), progress=progress, save=save)  # fmt: skip
    if paths["plot"]:
        module.plot(report, paths["plot"])
    print(module.markdown(report), end="")
    return 0
