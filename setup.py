"""Build script: the pure-Python package always; the native extension ``sparsetrain._C`` when it can be built.

``sparsetrain._C`` holds the CPU driver (built whenever torch and a C++ compiler are present) and,
when the CUDA part is built, the CUDA driver. Switches (environment):

* ``SPARSETRAIN_BUILD_NATIVE``: ``auto`` (default) builds the extension when it can and installs
  the pure-Python package with a note when it cannot (no compiler, no torch, or a failed compile);
  ``1`` requires it (the install fails loudly); ``0`` never builds it.
* ``SPARSETRAIN_BUILD_CUDA``: ``auto`` (default) adds the CUDA driver when torch is a CUDA build and
  a CUDA toolkit is found (``CUDA_HOME``); ``1`` requires it; ``0`` builds the CPU driver only.
  Architectures: ``TORCH_CUDA_ARCH_LIST`` (default ``8.0+PTX;9.0a``).

torch must be importable while this runs (it provides the headers and the build helpers): install
with ``pip install --no-build-isolation``, so that pip does not build in an isolated environment
(which would download a second torch). What was built, or why not, is written to
``sparsetrain/_native_build.txt`` and printed by ``sparsetrain info``. Nothing here touches a GPU.
"""

import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

STATUS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sparsetrain", "_native_build.txt")
DEFAULT_ARCHS = "8.0+PTX;9.0a"
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
NVCC_FLAGS = ["-O3", "--fmad=false", "-Xptxas=-v", "-lineinfo"]


def _mode(name: str) -> str:
    mode = os.environ.get(name, "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"{name} must be auto, 0 or 1, got {mode!r}")
    return mode


def _write_status(text: str) -> None:
    with open(STATUS_FILE, "w") as f:
        f.write(text + "\n")


def _fail_or_note(mode: str, reason: str) -> None:
    if mode == "1":
        raise SystemExit(f"sparsetrain: the native extension was required but cannot be built: {reason}")
    print(f"sparsetrain: installing without the native extension: {reason}", file=sys.stderr)
    _write_status(f"not built: {reason}")


def native_extension():
    """([extension], cmdclass) for this machine, or ([], {}) with the reason recorded."""
    mode = _mode("SPARSETRAIN_BUILD_NATIVE")
    cuda_mode = _mode("SPARSETRAIN_BUILD_CUDA")
    if mode == "0":
        _write_status("not built: SPARSETRAIN_BUILD_NATIVE=0 at install")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        _fail_or_note(
            mode,
            f"torch could not be imported at build time ({exc}); install torch first, then "
            "pip install --no-build-isolation",
        )
        return [], {}
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        _fail_or_note(mode, f"no C++ compiler ({compiler!r} is not on PATH); install one and reinstall")
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = ["csrc/ops.cpp", "csrc/cpu_driver.cpp", "csrc/host_scan.cpp"]
    cuda_reason = None
    if cuda_mode == "0":
        cuda_reason = "SPARSETRAIN_BUILD_CUDA=0 at install"
    elif torch.version.cuda is None:
        cuda_reason = f"torch {torch.__version__} is not a CUDA build"
    elif cpp_extension.CUDA_HOME is None:
        cuda_reason = "no CUDA toolkit found (set CUDA_HOME)"
    if cuda_reason and cuda_mode == "1":
        raise SystemExit(f"SPARSETRAIN_BUILD_CUDA=1 but the CUDA driver cannot be built: {cuda_reason}")
    cxx = list(CXX_FLAGS)
    if cuda_reason is None:
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        cxx += ["-DSPARSETRAIN_WITH_CUDA", f'-DSPARSETRAIN_CUDA_ARCHS="{archs}"']
        ext = cpp_extension.CUDAExtension(
            "sparsetrain._C",
            sources + ["csrc/cuda_driver.cu"],
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS},
            extra_link_args=["-fopenmp"],
        )
        status = f"built: cpu driver and cuda driver (TORCH_CUDA_ARCH_LIST={archs}, torch {torch.__version__})"
    else:
        ext = cpp_extension.CppExtension(
            "sparsetrain._C",
            sources,
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
        status = f"built: cpu driver only ({cuda_reason})"

    class BuildNative(cpp_extension.BuildExtension):
        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001  a failed compile must not block the Python install
                if mode == "1":
                    raise
                _fail_or_note(mode, f"compiling the native extension failed: {type(exc).__name__}: {exc}")
                return
            _write_status(status)

    return [ext], {"build_ext": BuildNative}


ext_modules, cmdclass = native_extension()
if not ext_modules:
    cmdclass = {"build_ext": build_ext}
setup(ext_modules=ext_modules, cmdclass=cmdclass)
