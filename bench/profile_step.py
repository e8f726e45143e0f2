"""A few fused steps of one benchmark case, for a profiler to capture (Nsight Compute, sanitizer).

    python bench/profile_step.py --case sgd --steps 3
    ncu --clock-control none --kernel-name regex:fused_step --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python bench/profile_step.py --case sgd

Cases (as in step_report.py): ``sgd`` one 268M tensor, SGD momentum + L2 + sampling + mask;
``adamw`` the same with AdamW; ``resnet`` the ResNet-50 parameter list; ``dead90`` a 16384 x 16384
weight with 90% of its rows (filters) pruned. ``--small`` divides the single-tensor sizes by 16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import resnet50_shapes  # noqa: E402
from step_report import make, ours  # noqa: E402


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
    shrink = 16 if args.small else 1
    shapes = {
        "sgd": [(2**28 // shrink,)],
        "adamw": [(2**28 // shrink,)],
        "resnet": resnet50_shapes(),
        "dead90": [(2**14 // shrink, 2**14)],
    }[args.case]
    step = ours(make(shapes, device), "adamw" if args.case == "adamw" else "sgd",
                dead_filter_fraction=0.9 if args.case == "dead90" else 0.0)  # fmt: skip
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    print(f"{args.case}: {args.steps} steps done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
