"""What every benchmark report carries (device, versions, date, command) and how it is written."""

from __future__ import annotations

import datetime
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

SCHEMA = 1


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the number of threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).name
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU: {model}, {torch.get_num_threads()} threads"


def environment(device: torch.device, command: str, kind: str) -> dict[str, Any]:
    """The header of a report: schema, kind, device, versions, date and the reproducing command."""
    from .. import __version__

    return {
        "schema": SCHEMA,
        "kind": kind,
        "device_type": device.type,
        "device": device_name(device),
        "sparsetrain": __version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "complete": False,
    }


def header_lines(report: dict[str, Any], title: str) -> list[str]:
    lines = [
        f"# {title}: {report['device']}",
        "",
        f"sparsetrain {report['sparsetrain']}, torch {report['torch']}, triton {report['triton'] or 'not installed'}, "
        f"Python {report['python']}; {report['date']}"
        + (f"; load average {report['load_average']:.1f} when it started" if report.get("load_average") else ""),
        "",
        f"Command: `{report['command']}`",
    ]
    if not report.get("complete", True):
        lines += ["", "**Incomplete run: the rows below are all that finished.**"]
    return lines


def require_matplotlib() -> None:
    """Fail early, naming the extra to install, when a plot is asked for without matplotlib."""
    from ..optional import require

    require("matplotlib", "--plot")


def write(report: dict[str, Any], markdown: str, *, json_path: str | None, md_path: str | None) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(markdown)


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms:.3f} ms"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def fmt_pct(fraction: float) -> str:
    """A fraction as a percentage with two significant digits (no exponent)."""
    pct = 100 * fraction
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.2g}%"
