"""Command line: ``sparsetrain info`` (versions, device, backends) and ``sparsetrain demo`` (the main job)."""

from __future__ import annotations

import argparse
import platform
import sys


def _version(module_name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module_name)
    except PackageNotFoundError:
        return "not installed"


def info() -> str:
    """A report of versions, the device and, per backend, whether it is usable here and why not."""
    import torch

    from . import __version__, backends

    lines = [
        f"sparsetrain {__version__}",
        f"python      {platform.python_version()}",
        f"torch       {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton      {_version('triton')}",
    ]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"device      {props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}")
    else:
        lines.append("device      cpu (no CUDA device visible)")
    lines.append("backends")
    for name in backends.BACKENDS:
        usable, reason = backends.availability(name)
        lines.append(f"  {name:<7} {'usable' if usable else 'not usable: ' + reason}")
    auto = "cuda tensors -> " + next(b for b in ("cuda", "triton", "torch") if backends.availability(b)[0])
    lines.append(f"  auto    cpu tensors -> torch; {auto}")
    if backends.availability("triton")[0]:
        from .backends import triton_backend as tb

        words, warps, blocks = tb.configure()
        warps_text = str(warps) if warps else f"{tb.AUTO_WARPS[False]} (SGD) / {tb.AUTO_WARPS[True]} (Adam)"
        lines.append(f"triton launch: blocks of {words * 32} elements, {blocks} per program, {warps_text} warps")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsetrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backends are usable here")
    demo = sub.add_parser("demo", help="the main job: prune an MLP and a CNN on real MNIST digits")
    demo.add_argument("--out", default="runs/demo", help="folder for the table and plots")
    demo.add_argument("--backend", default=None, help="auto (default), torch, triton or cuda")
    demo.add_argument("--epochs", type=int, default=None, help="override the number of epochs (quick checks)")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    from .demo import run_demo

    return run_demo(out=args.out, backend=args.backend, epochs=args.epochs)


if __name__ == "__main__":
    sys.exit(main())
