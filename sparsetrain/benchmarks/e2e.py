"""End-to-end benchmark: training-step time of a GPT-2-shaped transformer and a ResNet-50-shaped CNN.

Four ways to train the same model from the same initial weights on the same synthetic batches:

* ``dense``: torch's optimizer (AdamW for the transformer, SGD with momentum for the CNN; fused on
  CUDA, foreach on CPU), no pruning;
* ``eager pruning``: the same, with the pruning code users write today around it: L2 on the
  prunable weights' gradients (foreach), then after the step, every step, stochastic magnitude
  sampling calibrated to a cubic schedule and the mask applied to the weights and their state;
* ``sparsetrain StochasticMagnitude``: sparsetrain's optimizer and Pruner, a sampling event every step
  (same schedule, temperature and L2);
* ``sparsetrain GReg1``: sparsetrain's optimizer with GReg-1 (growing penalties on half of each layer's
  filters / output rows).

Prunable weights are those of the Linear and Conv layers (embeddings, norms and biases are left
alone, as the Pruner does by default). Each step is timed (device synchronized) after warm-up steps;
the report gives the median step time, its ratio over dense and the loss curve of each mode.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import report as rep
from .models import GPT2, ResNet50

MODES = ("dense", "eager pruning", "sparsetrain StochasticMagnitude", "sparsetrain GReg1")
TARGET, TEMPERATURE, L2 = 0.9, 1.0, 1e-4
POOL = 4  # distinct synthetic batches, cycled (the loss falls as the model fits them)


@dataclass(frozen=True)
class Workload:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator, torch.device], tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor]
    algo: str  # "adamw" or "sgd"
    lr: float
    description: str


def workloads(size: str) -> list[Workload]:
    """GPT-2 small and ResNet-50 at ``size``: ``quick`` (CI), ``cpu`` (a CPU run), ``full`` (a GPU)."""
    gpt = {
        "quick": dict(vocab=256, ctx=32, d=32, layers=2, heads=2, batch=2),
        "cpu": dict(vocab=2048, ctx=128, d=128, layers=4, heads=4, batch=8),
        "full": dict(vocab=50257, ctx=1024, d=768, layers=12, heads=12, batch=8),
    }[size]
    cnn = {
        "quick": dict(scale=32, image=32, batch=4, classes=10),
        "cpu": dict(scale=8, image=64, batch=8, classes=100),
        "full": dict(scale=1, image=224, batch=128, classes=1000),
    }[size]

    def tokens(gen, device):
        x = torch.randint(gpt["vocab"], (gpt["batch"], gpt["ctx"] + 1), generator=gen).to(device)
        return x[:, :-1], x[:, 1:]

    def images(gen, device):
        x = torch.randn(cnn["batch"], 3, cnn["image"], cnn["image"], generator=gen)
        y = torch.randint(cnn["classes"], (cnn["batch"],), generator=gen)
        return x.to(device), y.to(device)

    full = size == "full"
    return [
        Workload(
            "GPT-2 small" if full else "GPT-2-shaped (small)",
            lambda: GPT2(gpt["vocab"], gpt["ctx"], gpt["d"], gpt["layers"], gpt["heads"]),
            tokens,
            lambda logits, y: F.cross_entropy(logits.float().flatten(0, 1), y.flatten()),
            "adamw",
            3e-4 if full else 1e-3,
            f"d={gpt['d']}, {gpt['layers']} layers, {gpt['heads']} heads, vocab {gpt['vocab']}, "
            f"batch {gpt['batch']} x {gpt['ctx']} tokens",
        ),
        Workload(
            "ResNet-50" if full else "ResNet-50-shaped (small)",
            lambda: ResNet50(cnn["classes"], cnn["scale"]),
            images,
            lambda logits, y: F.cross_entropy(logits.float(), y),
            "sgd",
            0.05 if full else 0.01,
            f"widths 1/{cnn['scale']}, {cnn['classes']} classes, batch {cnn['batch']} x 3 x {cnn['image']} x "
            f"{cnn['image']}",
        ),
    ]


def prunable(model: nn.Module) -> list[Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


class EagerPruning:
    """The pruning code users write today: plain tensor operations around torch's optimizer."""

    def __init__(self, weights: list[Tensor], steps: int) -> None:
        self.weights, self.end = weights, steps
        self.alive = [torch.ones_like(w, dtype=torch.bool) for w in weights]

    @torch.no_grad()
    def before_step(self) -> None:
        torch._foreach_add_([w.grad for w in self.weights], self.weights, alpha=L2)

    @torch.no_grad()
    def after_step(self, step: int, opt: torch.optim.Optimizer) -> None:
        from ..methods.schedules import sparsity_at

        level = sparsity_at(step + 1, target=TARGET, start=1, end=self.end, kind="cubic")
        for w, alive in zip(self.weights, self.alive):
            numel = w.numel()
            count = alive.sum()
            wanted = (count - (numel - level * numel)).clamp(min=0)
            mean = w.abs().sum() / count.clamp(min=1)
            weight = torch.exp(-w.abs() / (TEMPERATURE * mean)) * alive
            q = (wanted / weight.sum().clamp(min=1e-30) * weight).clamp(max=1.0)
            alive &= torch.rand_like(w) >= q
            w.mul_(alive)
            for buf in opt.state[w].values():
                if isinstance(buf, Tensor) and buf.shape == w.shape:
                    buf.mul_(alive)


def _optimizer(mode: str, model: nn.Module, work: Workload, device: torch.device):
    import sparsetrain

    if mode in ("dense", "eager pruning"):
        fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
        if work.algo == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=work.lr, weight_decay=0.01, **fast)
        return torch.optim.SGD(model.parameters(), lr=work.lr, momentum=0.9, **fast)
    if work.algo == "adamw":
        return sparsetrain.optim.AdamW(model.parameters(), lr=work.lr, weight_decay=0.01)
    return sparsetrain.optim.SGD(model.parameters(), lr=work.lr, momentum=0.9)


def train(work: Workload, mode: str, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Train ``steps`` steps (after ``warmup`` untimed ones) and return per-step times and losses."""
    import sparsetrain
    from sparsetrain import methods

    torch.manual_seed(0)
    model = work.build().to(device)
    if device.type == "cuda" and isinstance(model, ResNet50):
        model = model.to(memory_format=torch.channels_last)
    opt = _optimizer(mode, model, work, device)
    total = warmup + steps
    eager = EagerPruning(prunable(model), total) if mode == "eager pruning" else None
    pruner = None
    gen = torch.Generator().manual_seed(1)
    batches = [work.batch(gen, device) for _ in range(POOL)]
    if mode == "sparsetrain StochasticMagnitude":
        method = methods.StochasticMagnitude(TARGET, start=1, end=total, interval=1, temperature=TEMPERATURE, l2=L2)
        pruner = sparsetrain.Pruner(model, opt, method, types=(nn.Linear, nn.Conv2d))
    elif mode == "sparsetrain GReg1":
        pruner = sparsetrain.Pruner(
            model, opt, methods.GReg1(0.5), types=(nn.Linear, nn.Conv2d), example_inputs=batches[0][0]
        )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    times, losses = [], []
    for i in range(total):
        x, y = batches[i % POOL]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast:
            loss = work.loss(model(x), y)
        loss.backward()
        if eager is not None:
            eager.before_step()
        opt.step()
        if eager is not None:
            eager.after_step(i, opt)
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
        losses.append(loss.detach())
    weights = prunable(model)
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    result = {
        "ms_per_step": statistics.median(times),
        "ms_steps": times,
        "losses": [float(v) for v in torch.stack(losses).float().cpu()],
        "prunable_sparsity": zeros,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if pruner is not None:
        pruner.remove()
    del model, opt, pruner, eager, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run(
    device: torch.device,
    *,
    size: str,
    steps: int,
    warmup: int,
    command: str,
    modes: list[str] | None = None,
    model_filter: list[str] | None = None,
    progress: bool = True,
    save: Callable[[dict[str, Any]], None] = lambda report: None,
) -> dict[str, Any]:
    """Run every mode on every workload; ``save(report)`` after each (a cut-off run keeps its rows)."""
    from tqdm.auto import tqdm

    modes = modes or list(MODES)
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown mode(s) {sorted(unknown)}; choose from {', '.join(MODES)}")
    chosen = [w for w in workloads(size) if not model_filter or any(f.lower() in w.name.lower() for f in model_filter)]
    report = rep.environment(device, command, "e2e")
    report.update(size=size, steps=steps, warmup=warmup, threads=torch.get_num_threads(),
                  autocast="bf16" if device.type == "cuda" else "none (fp32)", rows=[])  # fmt: skip
    save(report)
    bar = tqdm(total=len(chosen) * len(modes), desc="end-to-end", unit="run", disable=not progress)
    for work in chosen:
        rows = []
        for mode in modes:
            bar.set_postfix_str(f"{work.name}: {mode}")
            row = {"model": work.name, "config": work.description, "optimizer": work.algo, "mode": mode}
            row.update(train(work, mode, device, steps, warmup))
            rows.append(row)
            bar.update(1)
        dense = next((r["ms_per_step"] for r in rows if r["mode"] == "dense"), None)
        for row in rows:
            row["ratio_vs_dense"] = row["ms_per_step"] / dense if dense else None
        report["rows"] += rows
        save(report)
    bar.close()
    report["complete"] = True
    save(report)
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = rep.header_lines(report, "End-to-end training step")
    lines += [
        "",
        f"{report['steps']} timed steps after {report['warmup']} warm-up steps, median per step (device synchronized);"
        f" autocast: {report['autocast']}; {report.get('threads', '?')} torch threads. Pruning modes prune the Linear "
        f"and Conv weights toward {TARGET:.0%} (StochasticMagnitude: an event every step, cubic schedule over the "
        "run; GReg1: penalties growing on half of each layer's filters).",
        "",
        "| model | mode | ms / step | vs dense | first loss | last loss | prunable weights zero |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        ratio = "-" if r["ratio_vs_dense"] is None else f"{r['ratio_vs_dense']:.3f}x"
        lines.append(
            f"| {r['model']} ({r['config']}) | {r['mode']} | {rep.fmt_ms(r['ms_per_step'])} | {ratio} | "
            f"{r['losses'][0]:.3f} | {r['losses'][-1]:.3f} | {r['prunable_sparsity']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str) -> None:
    """Loss curves side by side (one panel per model) and step time relative to dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in report["rows"]))
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4.5 * (len(names) + 1), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        for r in report["rows"]:
            if r["model"] == name:
                ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["mode"], linewidth=1)
        ax.set(title=name, xlabel="step", ylabel="training loss")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    width = 0.8 / max(1, len(names))
    modes = list(dict.fromkeys(r["mode"] for r in report["rows"]))
    for i, name in enumerate(names):
        ratios = {r["mode"]: r["ratio_vs_dense"] or math.nan for r in report["rows"] if r["model"] == name}
        ax.bar([m + i * width for m in range(len(modes))], [ratios.get(m, math.nan) for m in modes], width, label=name)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xticks([m + width * (len(names) - 1) / 2 for m in range(len(modes))],
                  [m.replace("sparsetrain ", "st ") for m in modes], rotation=20, ha="right", fontsize=7)  # fmt: skip
    ax.set(title="step time / dense", ylabel="ratio")
    ax.legend(fontsize=7)
    fig.suptitle(f"End to end, {report['device']} ({report['date'][:10]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
