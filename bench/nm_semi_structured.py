"""GPU timing of a 2:4-sparse Linear layer on the semi-structured sparse kernels against the dense layer.

Forward + backward of ``nn.Linear(in, out)`` in float16 on a batch, dense and after
:func:`sparsetrain.nm.to_semi_structured` (weights pruned 2:4 by the N:M rule). Needs a CUDA GPU of
compute capability 8.0 or later; prints a markdown report (device, versions, date, command).

    python bench/nm_semi_structured.py [--sizes 4096x4096 8192x8192] [--batch 4096] [--out bench/results/....md]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
from pathlib import Path

import torch

from sparsetrain import contract
from sparsetrain.backends.torch_ref import nm_keep
from sparsetrain.nm import to_semi_structured


def _time(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["4096x4096", "8192x8192"])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        raise SystemExit("needs a CUDA GPU of compute capability 8.0 or later (semi-structured sparse kernels)")
    lines = [
        "# 2:4 Linear on semi-structured sparse kernels vs dense (float16, forward + backward)",
        "",
        f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"Command: python bench/nm_semi_structured.py {' '.join(sys.argv[1:])}".rstrip(),
        "",
        "| in x out | dense ms | 2:4 ms | speedup |",
        "|---|---|---|---|",
    ]
    for size in args.sizes:
        n_in, n_out = (int(v) for v in size.split("x"))
        dense = torch.nn.Linear(n_in, n_out, device="cuda", dtype=torch.half)
        with torch.no_grad():
            w = dense.weight.view(-1)
            w.mul_(nm_keep(contract.nm_code(2, 4), w.float(), torch.ones_like(w, dtype=torch.bool)))
        sparse = copy.deepcopy(dense)
        to_semi_structured(sparse)
        x = torch.randn(args.batch, n_in, device="cuda", dtype=torch.half, requires_grad=True)
        t_dense = _time(lambda: dense(x).sum().backward())
        t_sparse = _time(lambda: sparse(x).sum().backward())
        lines.append(f"| {n_in} x {n_out} | {t_dense:.3f} | {t_sparse:.3f} | {t_dense / t_sparse:.2f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
