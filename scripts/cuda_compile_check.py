"""Compile the CUDA driver (csrc/cuda_driver.cu) for sm_80 and sm_90a without a GPU, and report its resources.

The driver is compiled exactly as ``setup.py`` compiles it (the same nvcc flags, against the headers
of a CUDA build of torch), one cubin per architecture; ptxas's resource report gives the registers
per thread and the spill bytes of every kernel instantiation. Exits non-zero when a compile fails.

A CUDA build of torch is needed only for its headers: ``pip download`` fetches the wheel
(``--torch``, default ``torch==2.14.1``) into ``build/cuda-check/`` inside the checkout and only its
``torch/include`` tree is extracted (nothing is installed, nothing is imported). nvcc is taken from
``$CUDA_HOME/bin``, ``PATH`` or ``/usr/local/cuda/bin``.

    python scripts/cuda_compile_check.py [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "cuda-check"
ARCHS = ("80", "90a")
# setup.py's NVCC_FLAGS plus what torch's BuildExtension adds for every CUDA source
NVCC_FLAGS = [
    "-O3",
    "--fmad=false",
    "-lineinfo",
    "-std=c++20",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
    "-DTORCH_EXTENSION_NAME=_C",
    "-DTORCH_API_INCLUDE_EXTENSION_H",
    "-Xcompiler=-fPIC",
]


def find_nvcc() -> Path | None:
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    return next((c for c in candidates if c.exists()), None)


def torch_headers(spec: str) -> Path:
    """torch/include of the CUDA wheel ``spec``, extracted once under build/cuda-check/."""
    marker = WORK / f"include-{spec}"
    include = marker / "torch" / "include"
    if (include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        return include
    wheels = WORK / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", spec, "-d", str(wheels)]
    subprocess.run(cmd, check=True)
    name = spec.split("==")[0]
    wheel = max(wheels.glob(f"{name}-{spec.split('==')[-1]}*.whl"), key=lambda p: p.stat().st_mtime)
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.startswith("torch/include/")]
        archive.extractall(marker, members)
    if not (include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        raise SystemExit(f"{wheel.name} is not a CUDA build of torch (no c10/cuda headers)")
    return include


def parse_ptxas(text: str) -> list[dict]:
    """One record per kernel from ptxas -v output: registers, spill stores / loads, stack frame."""
    records, current = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2)}
            records.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
    return [r for r in records if "fused_step_kernel" in r["kernel"]]


def demangle(name: str) -> str:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return name
    full = subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip()
    m = re.search(r"fused_step_kernel<([^>]*)>", full)
    return f"fused_step_kernel<{m.group(1)}>" if m else full


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", default="torch==2.14.1", help="pip spec of a CUDA build of torch (headers only)")
    parser.add_argument("--json", action="store_true", help="one JSON line per kernel and architecture")
    args = parser.parse_args()
    nvcc = find_nvcc()
    if nvcc is None:
        print("no nvcc found (set CUDA_HOME to a CUDA toolkit)", file=sys.stderr)
        return 2
    WORK.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    include = torch_headers(args.torch)
    fetched = time.perf_counter() - start
    includes = [
        ROOT / "csrc",
        include,
        include / "torch" / "csrc" / "api" / "include",
        sysconfig.get_paths()["include"],
    ]
    records, running = [], []
    for arch in ARCHS:  # the architectures compile side by side
        out = WORK / f"cuda_driver.sm_{arch}.cubin"
        cmd = [str(nvcc), "-cubin", f"-arch=sm_{arch}", "-Xptxas=-v", *NVCC_FLAGS]
        cmd += [f"-I{p}" for p in includes] + [str(ROOT / "csrc" / "cuda_driver.cu"), "-o", str(out)]
        running.append((arch, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    t0 = time.perf_counter()
    for arch, proc in running:
        stdout, stderr = proc.communicate()
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"nvcc failed for sm_{arch}:\n{stderr[-8000:]}", file=sys.stderr)
            return 1
        found = parse_ptxas(stderr + stdout)
        if not found:
            print(f"no fused_step_kernel in ptxas's report for sm_{arch}:\n{stderr[-4000:]}", file=sys.stderr)
            return 1
        for r in found:
            r["kernel"] = demangle(r["kernel"])
            r["compile_s"] = round(seconds, 1)
        records += found
    nvcc_version = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout.strip()
    if args.json:
        for r in records:
            print(json.dumps(r))
    else:
        print(f"{nvcc_version.splitlines()[-1]}; torch headers from {args.torch} ({fetched:.0f} s to fetch)")
        print(f"{'kernel':<48} {'arch':<8} {'registers':>9} {'spill st':>9} {'spill ld':>9} {'stack':>6}")
        for r in records:
            print(
                f"{r['kernel']:<48} {r['arch']:<8} {r.get('registers', 0):>9} {r.get('spill_stores', 0):>9} "
                f"{r.get('spill_loads', 0):>9} {r.get('stack', 0):>6}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
