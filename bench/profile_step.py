"""A few fused steps of one benchmark case, for a profiler to capture (Nsight Compute, sanitizer).

    python bench/profile_step.py --case sgd --steps 3
    ncu --clock-control none --kernel-name regex:fused_step --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python bench/profile_step.py --case sgd

Cases (as in step_report.py): ``sgd`` one 268M tensor, SGD momentum + L2 + sampling + mask;
``adamw`` the same with AdamW; ``resnet`` the ResNet-50 parameter list; ``dead90`` a 16384 x 16384
weight with 90% of its rows (filters) pruned. ``--small`` takes ``step_report.py --quick``'s sizes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_report import make, ours, tensor_shapes  # noqa: E402

from sparsetrain.benchmarks.shapes import resnet50_shapes  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["sgd", "adamw", "resnet", "dead90"], default="sgd")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("profile_step needs a CUDA device; none is visible", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    big, square = tensor_shapes(args.small)
    shapes = {"sgd": [big], "adamw": [big], "resnet": resnet50_shapes(), "dead90": [square]}[args.case]
    step = ours(make(shapes, device), "adamw" if args.case == "adamw" else "sgd",
                dead_filter_fraction=0.9 if args.case == "dead90" else 0.0)  # fmt: skip
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    print(f"{args.case}: {args.steps} steps done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
