"""``sparsetrain bench shrink``: the training step before and after shrinking half of the channels away.

Two models, a ResNet-style CNN (BasicBlocks with BatchNorm and 1x1 downsampling) and a stack of
transformer feed-forward blocks (pre-LayerNorm, GELU, residual): each is trained with
``sparsetrain.optim.SGD`` (momentum) under a ``Pruner`` whose structured ``Magnitude`` prunes 50%
of every coupled channel group at once. The step is timed on the masked model (it still computes
every channel: the dense cost), then :meth:`sparsetrain.Pruner.shrink` removes the pruned channels
and the step is timed again. MACs per sample are counted by Torch-Pruning
(:func:`sparsetrain.export.size_report`) before and after; the report puts the MAC ratio beside the
measured step-time ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..demo import ResidualBlock
from . import report as rep
from .timing import synchronize

SIZES = {  # name -> (CNN width, CNN image side, MLP width, MLP tokens, batch)
    "quick": (4, 8, 16, 4, 4),
    "cpu": (32, 32, 256, 64, 32),
    "full": (64, 32, 768, 256, 64),
}


def resnet(w: int) -> nn.Module:
    """A ResNet-style CNN: a stem, three stages of two BasicBlocks (widths w, 2w, 4w), a linear head."""
    layers: list[nn.Module] = [nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
    cin = w
    for i, cout in enumerate((w, 2 * w, 4 * w)):
        layers += [ResidualBlock(cin, cout, 1 if i == 0 else 2), ResidualBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


class _FeedForward(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


def transformer_mlp(d: int) -> nn.Module:
    """Four transformer feed-forward blocks (d -> 4d -> d) and a linear read-out of the mean token."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(*[_FeedForward(d) for _ in range(4)])
            self.head = nn.Linear(d, 10)

        def forward(self, x):
            return self.head(self.blocks(x).mean(dim=1))

    return Model()


def workloads(size: str) -> list[tuple[str, str, Callable[[], nn.Module], tuple[int, ...]]]:
    w, side, d, tokens, batch = SIZES[size]
    return [
        ("resnet-cnn", f"width {w}, {side}x{side} images, batch {batch}", lambda: resnet(w), (batch, 3, side, side)),
        ("transformer-mlp", f"d {d}, hidden {4 * d}, {tokens} tokens, batch {batch}", lambda: transformer_mlp(d),
         (batch, tokens, d)),
    ]  # fmt: skip


def measure(factory, shape, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Step time and MACs of the masked model (50% of each channel group pruned), then of the shrunk one."""
    import sparsetrain
    from sparsetrain import methods
    from sparsetrain.export import size_report

    torch.manual_seed(0)
    model = factory().to(device)
    x = torch.randn(*shape, device=device)
    y = torch.randint(0, 10, (shape[0],), device=device)
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    pruner = sparsetrain.Pruner(model, opt, methods.Magnitude(0.5, structure="filters"), example_inputs=x[:2])

    def step():
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    def timed() -> float:
        import time

        for _ in range(warmup):
            step()
        synchronize(device)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2] * 1e3

    before = size_report(model, x[:1])
    ms_before = timed()
    pruner.shrink()
    after = size_report(model, x[:1])
    ms_after = timed()
    return {
        "params_before": before["params"], "params_after": after["params"],
        "macs_before": before["macs"], "macs_after": after["macs"],
        "ms_before": ms_before, "ms_after": ms_after,
        "mac_ratio": after["macs"] / before["macs"], "time_ratio": ms_after / ms_before,
    }  # fmt: skip


def run(
    device: torch.device,
    *,
    size: str,
    steps: int,
    warmup: int,
    command: str,
    model_filter: list[str] | None = None,
    progress: bool = True,
    save: Callable[[dict[str, Any]], None] = lambda report: None,
) -> dict[str, Any]:
    """Measure every workload; ``save(report)`` after each."""
    report = rep.environment(device, command, "shrink")
    report.update(size=size, steps=steps, warmup=warmup, threads=torch.get_num_threads(), rows=[])
    save(report)
    for name, config, factory, shape in workloads(size):
        if model_filter and not any(f.lower() in name for f in model_filter):
            continue
        report["rows"].append({"model": name, "config": config, **measure(factory, shape, device, steps, warmup)})
        save(report)
    report["complete"] = True
    save(report)
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = rep.header_lines(report, "Training step before and after shrinking")
    lines += [
        "",
        f"Median of {report['steps']} timed training steps (forward, backward, fused SGD step) after "
        f"{report['warmup']} warm-up steps; {report.get('threads', '?')} torch threads. Before: the masked model "
        "with 50% of every coupled channel group pruned (it still computes them); after: `pruner.shrink()`. "
        "MACs per sample counted by Torch-Pruning.",
        "",
        "| model | params before -> after | MACs before -> after | MAC ratio | ms / step before | ms / step after "
        "| step-time ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['model']} ({r['config']}) | {r['params_before']:,} -> {r['params_after']:,} | "
            f"{r['macs_before']:,} -> {r['macs_after']:,} | {r['mac_ratio']:.3f} | {rep.fmt_ms(r['ms_before'])} | "
            f"{rep.fmt_ms(r['ms_after'])} | {r['time_ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str) -> None:
    """Step time before and after, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(rows))
    ax.bar([i - 0.2 for i in xs], [r["ms_before"] for r in rows], 0.4, label="masked (before)")
    ax.bar([i + 0.2 for i in xs], [r["ms_after"] for r in rows], 0.4, label="shrunk (after)")
    ax.set_xticks(list(xs), [r["model"] for r in rows])
    ax.set_ylabel("ms / training step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
