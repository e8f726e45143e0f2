"""Plots of pruning dynamics from :meth:`sparsetrain.metrics.History.as_dict` (matplotlib, PNG files).

Curves of different layers often coincide (every layer follows the same sparsity schedule, GReg's
penalty grows alike in every layer), so each series gets its own colour, line style and marker,
with markers placed at staggered steps: coinciding curves still show every series' markers.
Layers are labelled by their module names; the legend sits beside the axes, never over a curve.
"""

from __future__ import annotations

from itertools import cycle
from pathlib import Path

from .optional import require

require("matplotlib", "plots").use("Agg")
plt = require("matplotlib.pyplot", "plots")

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")
MARKERS_PER_CURVE = 8


def layer_label(name: str) -> str:
    """A parameter name as a layer label: ``"features.0.weight"`` -> ``"features.0"``."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


class _Styles:
    """Colour, line style and staggered marker positions for the n-th series of a figure."""

    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self.index = 0
        self.colors = cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])

    def next(self, length: int, linestyle: str | None = None) -> dict:
        i = self.index
        self.index += 1
        every = max(1, length // MARKERS_PER_CURVE)
        if every == 1 and length >= 6:  # short series: every other point, alternating between series
            every = 2
        offset = (i * every) // self.total if every > 2 else i % every
        return {
            "color": next(self.colors),
            "linestyle": linestyle or LINESTYLES[i % len(LINESTYLES)],
            "marker": MARKERS[i % len(MARKERS)],
            "markevery": (min(max(length - 1, 0), offset), every),
            "markersize": 7 - 2 * (i % 2),  # a marker drawn over an equal one leaves a ring visible
            "linewidth": 1.6,
        }


def plot_node_dynamics(histories: dict[str, dict], path: Path) -> Path:
    """Dead output nodes and weight sparsity per layer over steps, for several runs (e.g. L1 vs L2).

    Args:
        histories: ``{run label: History.as_dict()}``; a label ``"l1"`` / ``"l2"`` is shown as
            ``L1`` / ``L2``. Runs are told apart by line style (solid, dashed, ...), layers by
            colour and marker.
        path: the PNG file to write.

    Returns:
        ``path``.
    """
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    layers = sorted({name for h in histories.values() for name in h["layers"]})
    styles = _Styles(len(layers) * len(histories))
    colors = {}
    markers = {}
    for run_index, (run, history) in enumerate(histories.items()):
        linestyle = LINESTYLES[run_index % len(LINESTYLES)]
        for name, series in history["layers"].items():
            style = styles.next(len(history["step"]), linestyle)
            style["color"] = colors.setdefault(name, style["color"])
            style["marker"] = markers.setdefault(name, style["marker"])
            style["fillstyle"] = "full" if run_index == 0 else "none"  # runs: filled vs hollow markers
            label = f"{layer_label(name)} ({run.upper()})"
            axes[0].plot(history["step"], [100 * v for v in series["dead_outputs"]], label=label, **style)
            axes[1].plot(history["step"], [100 * v for v in series["weight_sparsity"]], label=label, **style)
    axes[0].set(title="dead output nodes (all incoming weights zero)", xlabel="step", ylabel="% of the layer's nodes")
    axes[1].set(title="weight sparsity", xlabel="step", ylabel="% of the layer's weights")
    runs = " vs ".join(r.upper() for r in histories)
    fig.suptitle(f"Node pruning under stochastic magnitude sampling: {runs} decay")
    return _save(fig, axes, path, legend_axis=axes[1])


def plot_sparsity(history: dict, path: Path, title: str) -> Path:
    """Weight sparsity, dead outputs and dead inputs of every layer over steps.

    Args:
        history: ``History.as_dict()`` of one run.
        path: the PNG file to write.
        title: the run's name, shown in the title.

    Returns:
        ``path``.
    """
    metrics = (("weight_sparsity", "weights zero"), ("dead_outputs", "outputs dead"), ("dead_inputs", "inputs dead"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharey=True)
    styles = _Styles(len(history["layers"]))
    for name, series in history["layers"].items():
        style = styles.next(len(history["step"]))
        for ax, (key, _) in zip(axes, metrics):
            ax.plot(history["step"], [100 * v for v in series[key]], label=layer_label(name), **style)
    for ax, (_, label) in zip(axes, metrics):
        ax.set(title=label, xlabel="step")
    axes[0].set(ylabel="% of the layer")
    fig.suptitle(f"Sparsity per layer: {title}")
    return _save(fig, axes, path, legend_axis=axes[-1])


def plot_greg(history: dict, path: Path, pruned_at: int | None = None) -> Path:
    """GReg's penalty ``lam`` on the picked groups and the kept/picked magnitude ratio per layer.

    Args:
        history: ``History.as_dict()`` of a GReg run (its scalars ``lam/<layer>`` and
            ``mag_ratio/<layer>``).
        path: the PNG file to write.
        pruned_at: the step at which the picked groups were pruned (a vertical line), if any.

    Returns:
        ``path``.
    """
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    keys = sorted(history["scalars"])
    styles = _Styles(len(keys))
    by_layer: dict[str, dict] = {}
    for key in keys:
        kind, name = key.split("/", 1)
        values = history["scalars"][key]
        style = by_layer.setdefault(name, styles.next(len(values)))
        ax = axes[0] if kind == "lam" else axes[1]
        ax.plot(history["step"][: len(values)], values, label=layer_label(name), **style)
    if pruned_at is not None:
        for ax in axes:
            ax.axvline(pruned_at, color="gray", linestyle=":", label=f"picked groups pruned (step {pruned_at})")
    axes[0].set(title="lam on the picked groups", xlabel="step", ylabel="lam")
    ratios = [v for k in keys if k.startswith("mag_ratio/") for v in history["scalars"][k] if v == v and v > 0]
    wide = bool(ratios) and max(ratios) > 10 * min(ratios)  # log scale only when the ratio spans a decade
    axes[1].set(
        title="mean|kept| / mean|picked|",
        xlabel="step",
        ylabel="ratio (log scale)" if wide else "ratio",
        yscale="log" if wide else "linear",
    )
    fig.suptitle("GReg: growing penalty on the groups to prune")
    return _save(fig, axes, path, legend_axis=axes[1])


def _save(fig, axes, path: Path, legend_axis) -> Path:
    """Grid on every axis, one legend beside ``legend_axis``, then write the PNG and free the figure."""
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = legend_axis.get_legend_handles_labels()
    if handles:
        legend_axis.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
