"""Plots of pruning dynamics (matplotlib, written as PNG files)."""

from __future__ import annotations

from pathlib import Path

from .optional import require

require("matplotlib", "plots").use("Agg")
plt = require("matplotlib.pyplot", "plots")


def plot_node_dynamics(histories: dict[str, dict], path: Path) -> Path:
    """Dead output nodes per layer over steps, one line style per decay (e.g. L1 vs L2)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"l1": "--", "l2": "-"}
    for decay, history in histories.items():
        for name, series in history["layers"].items():
            axes[0].plot(
                history["step"],
                [100 * v for v in series["dead_outputs"]],
                styles.get(decay, "-"),
                label=f"{name} ({decay.upper()})",
            )
            axes[1].plot(
                history["step"],
                [100 * v for v in series["weight_sparsity"]],
                styles.get(decay, "-"),
                label=f"{name} ({decay.upper()})",
            )
    axes[0].set(title="dead output nodes (all incoming weights zero)", xlabel="step", ylabel="% of nodes")
    axes[1].set(title="weight sparsity", xlabel="step", ylabel="% of weights")
    fig.suptitle("Node pruning under stochastic magnitude sampling: L1 vs L2 decay")
    return _save(fig, axes, path)


def plot_sparsity(history: dict, path: Path, title: str) -> Path:
    """Weight sparsity and dead outputs per layer over steps."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, series in history["layers"].items():
        line = ax.plot(history["step"], [100 * v for v in series["weight_sparsity"]], label=f"{name} weights")[0]
        ax.plot(
            history["step"],
            [100 * v for v in series["dead_outputs"]],
            ":",
            color=line.get_color(),
            label=f"{name} dead outputs",
        )
    ax.set(title=f"sparsity per layer: {title}", xlabel="step", ylabel="%")
    return _save(fig, [ax], path)


def plot_greg(history: dict, path: Path, pruned_at: int | None = None) -> Path:
    """GReg's lam on the picked groups and the kept/picked magnitude ratio per layer over steps."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, values in history["scalars"].items():
        kind, name = key.split("/", 1)
        ax = axes[0] if kind == "lam" else axes[1]
        ax.plot(history["step"][: len(values)], values, label=name)
    if pruned_at is not None:
        for ax in axes:
            ax.axvline(pruned_at, color="gray", linestyle=":", label=f"picked groups pruned (step {pruned_at})")
    axes[0].set(title="lam on picked groups", xlabel="step", ylabel="lam")
    axes[1].set(title="mean|kept| / mean|picked|", xlabel="step", ylabel="ratio", yscale="log")
    return _save(fig, axes, path)


def _save(fig, axes, path: Path) -> Path:
    """Grid and legend on every axis, then write the PNG and free the figure."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
