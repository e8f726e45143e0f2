"""Structured export per architecture: parameters and MACs before/after, and the export's output error.

Runs, on CPU, what tests/test_coupled.py checks: ResNet-18, VGG, U-Net, MobileNetV2 (small widths,
8x8 inputs) and GPT-2 / BERT (tiny random configs), each pruned by GReg-1, GReg-2 and
Magnitude(structure="filters") at target 0.5 over 6 steps, then exported. The relative error is
max |exported - masked| / max |masked| over every output tensor. Also counts, for the CNNs, the
tensors whose exported values differ from Torch-Pruning's MetaPruner at the same ratio on the
same importance (group L2, summed over members, biases included).

    python bench/structured_export.py [--out bench/results/structured_export_cpu.md]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from architectures import ARCHITECTURES, build  # noqa: E402

import sparsetrain  # noqa: E402
from sparsetrain import methods  # noqa: E402
from sparsetrain.coupled import call_model, flat_tensors  # noqa: E402
from sparsetrain.export import relative_error, size_report  # noqa: E402

OUTPUT_LAYER = {"resnet18": "fc", "vgg": "17", "unet": "head", "mobilenetv2": "classifier"}


def method_of(kind: str):
    if kind == "GReg1":
        return methods.GReg1(0.5, update_interval=1, delta=0.1, ceiling=0.15, stabilize=1)
    if kind == "GReg2":
        return methods.GReg2(
            0.5, update_interval=1, delta=0.1, ceiling=0.15, stabilize=1, delta_all=0.01, warm_ceiling=0.01
        )
    return methods.Magnitude(0.5, structure="filters", schedule="linear", start=0, end=4, interval=2)


def run(arch: str, kind: str) -> dict:
    model, x = build(arch)
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, backend="torch")
    pruner = sparsetrain.Pruner(model, opt, method_of(kind), example_inputs=x)
    for _ in range(6):
        out = call_model(model, x)
        sum(t.float().square().mean() for t in flat_tensors(out) if t.is_floating_point()).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    small = pruner.export(x)
    with torch.no_grad():
        error = relative_error(call_model(small, x), call_model(model, x))
    before, after = size_report(model, x), size_report(small, x)
    alive = pruner.alive_units()
    return {
        "arch": arch,
        "method": kind,
        "channels": f"{sum(int((~a).sum()) for a in alive)}/{sum(a.numel() for a in alive)}",
        "groups": len(alive),
        "params": (before["params"], after["params"]),
        "macs": (before["macs"], after["macs"]),
        "error": error,
    }


def metapruner_differences(arch: str) -> str:
    import torch_pruning as tp

    model, x = build(arch)
    reference = copy.deepcopy(model)
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.01, backend="torch")
    pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.5, structure="filters", norm=2), example_inputs=x)
    ours = pruner.export(x).state_dict()
    importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None, bias=True)
    output = dict(reference.named_modules())[OUTPUT_LAYER[arch]]
    tp.pruner.MetaPruner(reference, x, importance=importance, pruning_ratio=0.5, ignored_layers=[output]).step()
    theirs = reference.state_dict()
    differ = [k for k in ours if ours[k].shape != theirs[k].shape or not torch.equal(ours[k], theirs[k])]
    return f"{len(differ)} of {len(ours)} tensors differ" + (f" ({', '.join(differ[:4])}, ...)" if differ else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=f"bench/results/structured_export_cpu_{datetime.date.today().isoformat()}.md")
    args = parser.parse_args()
    import transformers  # noqa: F401  (GPT-2's Conv1D becomes a default target type)

    torch.manual_seed(0)
    started = time.perf_counter()
    rows = [run(arch, kind) for arch in ARCHITECTURES for kind in ("GReg1", "GReg2", "Magnitude")]
    meta = {arch: metapruner_differences(arch) for arch in OUTPUT_LAYER}
    import torch_pruning

    lines = [
        "# Structured export per architecture (CPU)",
        "",
        f"- date: {datetime.date.today().isoformat()}; command: `python bench/structured_export.py`",
        f"- machine: {platform.machine()}, {platform.system()}; python {platform.python_version()}; "
        f"torch {torch.__version__}; torch-pruning {torch_pruning.__version__}; "
        f"transformers {sys.modules['transformers'].__version__}",
        f"- wall time {time.perf_counter() - started:.0f} s",
        "",
        "| architecture | method | channels removed | groups | params before -> after | MACs before -> after "
        "| export rel. error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        (p0, p1), (m0, m1) = r["params"], r["macs"]
        lines.append(
            f"| {r['arch']} | {r['method']} | {r['channels']} | {r['groups']} | {p0} -> {p1} ({p1 / p0:.1%}) "
            f"| {m0} -> {m1} ({m1 / m0:.1%}) | {r['error']:.1e} |"
        )
    lines += [
        "",
        "Against Torch-Pruning's MetaPruner (one-shot Magnitude norm 2 vs MetaPruner, ratio 0.5, group L2 "
        "importance summed over members with biases):",
        "",
    ]
    lines += [f"- {arch}: {text}" for arch, text in meta.items()]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
