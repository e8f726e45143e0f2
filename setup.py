"""Build script: the pure-Python package always; the CUDA extension only when it can be built.

``SPARSETRAIN_BUILD_CUDA``: ``auto`` (default) builds ``sparsetrain._C`` when csrc/ has sources,
torch is a CUDA build and a CUDA toolkit is found; ``1`` requires it (fails loudly otherwise);
``0`` never builds it. Nothing here touches a GPU, so a CPU-only install always works.
"""

import glob
import os

from setuptools import setup


def cuda_extension():
    mode = os.environ.get("SPARSETRAIN_BUILD_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"SPARSETRAIN_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if mode == "0" or (mode == "auto" and not sources):
        return []
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        if mode == "1":
            raise SystemExit(f"SPARSETRAIN_BUILD_CUDA=1 but torch cannot be imported: {exc}") from exc
        return []
    reason = None
    if not sources:
        reason = "csrc/ has no sources"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    elif CUDA_HOME is None:
        reason = "no CUDA toolkit found (set CUDA_HOME)"
    if reason:
        if mode == "1":
            raise SystemExit(f"SPARSETRAIN_BUILD_CUDA=1 but the extension cannot be built: {reason}")
        return []
    ext = CUDAExtension("sparsetrain._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return [ext], {"build_ext": BuildExtension}


built = cuda_extension()
setup(ext_modules=built[0] if built else [], cmdclass=built[1] if built else {})
