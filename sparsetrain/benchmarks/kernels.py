"""Kernel benchmark: one optimizer step with pruning, per provider, against the device's copy ceiling.

Rows are (model, algorithm, dtype, sparsity) cases; each is timed for every provider usable here:

* ``sparsetrain[<backend>]``: the fused step on each sparsetrain backend that runs on this device
  (found through :mod:`sparsetrain.backends`, so a newly built backend appears by itself);
* ``torch.optim``: torch's SGD / AdamW with no pruning (fused on CUDA, foreach on CPU);
* ``eager``: the pruning step users write today around it (foreach L2, torch's step, sampling, mask);
* ``compiled``: ``torch.compile`` of that pruning step (compile time reported separately).

The peers do dense work whatever the mask, so at 50% / 90% sparsity their 0% time is reused (marked
in the report). Each time is converted to effective bandwidth at the bytes the case must move in
sparsetrain's format (weights read and written, gradient read, optimizer buffers in the weights' dtype read and
written, 1-bit mask read and written; a dead element only its mask bit) and to a fraction of the
copy ceiling measured in the same run. A second table times the global magnitude threshold
(sparsetrain's multi-tensor radix select) against ``torch.sort`` / ``torch.kthvalue`` of the
concatenated magnitudes, with the peak memory each holds.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from . import report as rep
from . import steps
from .shapes import gpt2_medium_shapes, resnet50_shapes
from .timing import DEFAULT, QUICK, Budget, copy_ceiling, peak_extra_bytes, time_ms

PEERS = ("torch.optim", "eager", "compiled")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SPARSITIES = ((0.0, "dense"), (0.5, "unstructured"), (0.9, "unstructured"), (0.5, "structured"), (0.9, "structured"))
BUFFERS = {"sgd": 1, "adamw": 2}  # algorithm buffers per element (in the parameter's dtype, as torch.optim's)
MASK_BYTES, DEAD_BYTES = 0.25, 0.125  # a live element's mask bit read + written; a dead one's read
COMPILE_MAX_TENSORS = 200  # on a GPU; beyond this, compiling the unrolled per-tensor loop takes minutes
# sizes: "quick" for CI on a small CPU, "cpu" for a full CPU run, "full" for a GPU
SIZES = ("quick", "cpu", "full")


@dataclass(frozen=True)
class Provider:
    name: str
    description: str
    build: Callable[..., steps.Step]
    sparsity_aware: bool  # its work depends on the mask; peers do dense work whatever the mask


@dataclass(frozen=True)
class Case:
    model: str
    shapes: tuple[tuple[int, ...], ...]
    algo: str
    dtype: str
    sparsity: float
    structure: str

    @property
    def key(self) -> tuple:
        return (self.model, self.algo, self.dtype)


def providers(device: torch.device, wanted: list[str] | None = None) -> tuple[list[Provider], dict[str, str]]:
    """The providers that run on ``device`` and, for the others, why not."""
    from .. import backends

    found: list[Provider] = []
    skipped: dict[str, str] = {}
    for name in backends.BACKENDS:
        usable, reason = backends.availability(name)
        if usable:
            try:
                backends.resolve(name, device)
            except backends.BackendUnavailableError as exc:
                usable, reason = False, str(exc)
        if usable and name == "triton" and device.type != "cuda":
            usable, reason = False, "runs on CPU only interpreted (TRITON_INTERPRET=1), which times the interpreter"
        label = f"sparsetrain[{name}]"
        if usable:
            build = partial(steps.sparsetrain_step, backend=name)
            found.append(Provider(label, f"sparsetrain fused step, {name} backend", build, True))
        else:
            skipped[label] = reason
    fast = "fused" if device.type == "cuda" else "foreach"
    found += [
        Provider("torch.optim", f"torch.optim SGD / AdamW ({fast}), no pruning", steps.torch_optim_step, False),
        Provider("eager", f"foreach L2 + torch.optim ({fast}) + sampling + mask", steps.eager_pruning_step, False),
        Provider("compiled", "torch.compile of the eager pruning step", steps.compiled_pruning_step, False),
    ]
    if wanted:
        unknown = set(wanted) - {p.name for p in found} - set(skipped)
        if unknown:
            names = [p.name for p in found] + list(skipped)
            raise SystemExit(f"unknown provider(s) {sorted(unknown)}; known: {', '.join(names)}")
        for name in wanted:
            if name in skipped:
                raise SystemExit(f"provider {name} cannot run here: {skipped[name]}")
        found = [p for p in found if p.name in wanted]
    return found, skipped


def models(size: str) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Model name -> parameter shapes at ``size`` (``quick`` and ``cpu`` keep the tensor counts and
    divide the widths: the torch reference backend, which every CPU can run, is slow per element)."""
    if size == "quick":
        return {
            "one tensor 128x128": ((128, 128),),
            "ResNet-50 list, 1/32 width": tuple(resnet50_shapes(32)),
            "GPT-2-medium list, 1/128 width": tuple(gpt2_medium_shapes(128)),
        }
    if size == "cpu":
        return {
            "one tensor 512x512": ((512, 512),),
            "ResNet-50 list, 1/8 width": tuple(resnet50_shapes(8)),
            "GPT-2-medium list, 1/32 width": tuple(gpt2_medium_shapes(32)),
        }
    if size == "full":
        return {
            "one tensor 16384x16384": ((16384, 16384),),
            "ResNet-50 list": tuple(resnet50_shapes()),
            "GPT-2-medium list": tuple(gpt2_medium_shapes()),
        }
    raise ValueError(f"unknown size {size!r}; choose one of {SIZES}")


def compile_skip(case: Case, size: str, device: torch.device) -> str | None:
    """Why the compiled peer is not run for ``case`` by default (compile time), or ``None``."""
    if case.dtype != "fp32":
        return "compiled for fp32 only (compile time)"
    if size == "quick" and (case.algo != "sgd" or case.sparsity):
        return "compiled for the dense SGD case only with --quick (compile time)"
    limit = COMPILE_MAX_TENSORS if device.type == "cuda" else 1
    if len(case.shapes) > limit:
        return f"compiled for lists of at most {limit} tensor(s) on {device.type} (compile time)"
    return None


def cases(size: str, matrix: str, model_filter: list[str] | None = None) -> Iterator[Case]:
    """``matrix="full"``: every model x algorithm x dtype x sparsity. ``"reduced"``: every model x
    algorithm x dtype dense, and the sparse variants for SGD fp32. ``"quick"``: every code path once
    (the lists dense with SGD fp32; AdamW, bf16 and 90% sparse variants on the single tensor)."""
    for index, (model, shapes) in enumerate(models(size).items()):
        if model_filter and not any(f.lower() in model.lower() for f in model_filter):
            continue
        for algo in steps.ALGOS:
            for dtype in DTYPES:
                for sparsity, structure in SPARSITIES:
                    if matrix == "reduced" and sparsity and (algo, dtype) != ("sgd", "fp32"):
                        continue
                    if matrix == "quick":
                        if index > 0 and (sparsity or dtype != "fp32" or algo != "sgd"):
                            continue
                        if index == 0 and sparsity and ((algo, dtype) != ("sgd", "fp32") or sparsity == 0.5):
                            continue
                    yield Case(model, shapes, algo, dtype, sparsity, structure)


def bytes_per_element(algo: str, dtype: str, dead_fraction: float) -> float:
    """Bytes one element must move in sparsetrain's format (see the module docstring)."""
    param = torch.finfo(DTYPES[dtype]).bits // 8
    live = 3 * param + 2 * param * BUFFERS[algo] + MASK_BYTES  # w, g read, w written; buffers read and written
    return (1 - dead_fraction) * live + dead_fraction * DEAD_BYTES


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure(provider: Provider, case: Case, device: torch.device, budget: Budget) -> dict[str, Any]:
    params = steps.make(case.shapes, device, DTYPES[case.dtype])
    masks = steps.make_masks(params, case.sparsity, case.structure)
    step = provider.build(params, case.algo, masks)
    out: dict[str, Any] = {"ms": time_ms(step, device, budget)}
    if hasattr(step, "compile_s"):
        out["compile_s"] = step.compile_s
    del params, masks, step
    _free(device)
    return out


def run(
    device: torch.device,
    *,
    size: str,
    matrix: str,
    command: str,
    provider_names: list[str] | None = None,
    model_filter: list[str] | None = None,
    compile_all: bool = False,
    select: bool = True,
    progress: bool = True,
    save: Callable[[dict[str, Any]], None] = lambda report: None,
) -> dict[str, Any]:
    """Run the kernel benchmark; ``save(report)`` is called after every case (a cut-off run keeps its rows)."""
    from tqdm.auto import tqdm

    budget = QUICK if size == "quick" else DEFAULT
    found, skipped = providers(device, provider_names)
    todo = list(cases(size, matrix, model_filter))
    report = rep.environment(device, command, "kernels")
    report.update(
        size=size,
        matrix=matrix,
        threads=torch.get_num_threads(),
        providers={p.name: p.description for p in found},
        skipped_providers=skipped,
        rows=[],
        select=[],
    )
    ceiling_elements = {"quick": 2**22, "cpu": 2**24, "full": 2**28}[size]
    ceiling = copy_ceiling(device, ceiling_elements, budget)
    report["copy_ceiling_GBps"] = ceiling / 1e9
    save(report)
    reused: dict[tuple, dict[str, Any]] = {}
    bar = tqdm(total=len(todo) * len(found), desc="kernel benchmark", unit="step", disable=not progress)
    for case in todo:
        elements = sum(math.prod(s) for s in case.shapes)
        masks = steps.make_masks(steps.make(case.shapes, torch.device("cpu")), case.sparsity, case.structure)
        dead = 0.0 if masks is None else 1 - sum(int(m.sum()) for m in masks) / elements
        del masks
        bpe = bytes_per_element(case.algo, case.dtype, dead)
        floor_ms = elements * bpe / ceiling * 1e3
        base = {
            "model": case.model,
            "tensors": len(case.shapes),
            "elements": elements,
            "algo": case.algo,
            "dtype": case.dtype,
            "sparsity": case.sparsity,
            "structure": case.structure,
            "dead_fraction": dead,
            "bytes_per_element": bpe,
            "floor_ms": floor_ms,
        }
        case_rows = []
        for provider in found:
            bar.set_postfix_str(f"{case.model}, {case.algo}, {case.dtype}, {case.sparsity:.0%} {provider.name}")
            row = dict(base, provider=provider.name)
            reuse_key = (provider.name, *case.key)
            why_not = compile_skip(case, size, device) if provider.name == "compiled" and not compile_all else None
            if why_not:
                row["skipped"] = why_not
            elif not provider.sparsity_aware and case.sparsity and reuse_key in reused:
                row.update(reused[reuse_key], reused_from_dense=True)
            else:
                try:
                    row.update(_measure(provider, case, device, budget))
                except Exception as exc:  # a provider that fails is reported, the others still run
                    row["skipped"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    _free(device)
                if not case.sparsity and "ms" in row:
                    reused[reuse_key] = {k: row[k] for k in ("ms", "compile_s") if k in row}
            if "ms" in row:
                row["GBps"] = elements * bpe / (row["ms"] * 1e-3) / 1e9
                row["of_ceiling"] = floor_ms / row["ms"]
            case_rows.append(row)
            bar.update(1)
        peer_ms = {r["provider"]: r["ms"] for r in case_rows if r["provider"] in PEERS and "ms" in r}
        for row in case_rows:
            if "ms" in row:
                row["speedup"] = {peer: ms / row["ms"] for peer, ms in peer_ms.items() if peer != row["provider"]}
        report["rows"] += case_rows
        save(report)
    bar.close()
    if select:
        report["select"] = run_select(device, size, model_filter, budget, progress)
    report["complete"] = True
    save(report)
    return report


def run_select(
    device: torch.device, size: str, model_filter: list[str] | None, budget: Budget, progress: bool = True
) -> list[dict[str, Any]]:
    """The global k-th smallest magnitude over a parameter list: radix select vs sort vs kthvalue."""
    from tqdm.auto import tqdm

    from ..selection import kth_smallest_abs

    def concatenated(params):
        return torch.cat([p.detach().abs().reshape(-1) for p in params])

    methods = {
        "sparsetrain radix select": lambda params, k: kth_smallest_abs(params, k),
        "torch.sort": lambda params, k: concatenated(params).sort().values[k - 1].item(),
        "torch.kthvalue": lambda params, k: concatenated(params).kthvalue(k).values.item(),
    }
    rows = []
    chosen = [
        (m, s) for m, s in models(size).items() if not model_filter or any(f.lower() in m.lower() for f in model_filter)
    ]
    fractions = (0.9,) if size == "quick" else (0.5, 0.9)
    bar = tqdm(total=len(chosen) * len(fractions) * len(methods), desc="global threshold", unit="run",
               disable=not progress)  # fmt: skip
    for model, shapes in chosen:
        params = [torch.randn(s, device=device, generator=torch.Generator(device).manual_seed(i))
                  for i, s in enumerate(shapes)]  # fmt: skip
        total = sum(p.numel() for p in params)
        for fraction in fractions:
            k = max(1, round(fraction * total))
            values = {}
            for name, fn in methods.items():
                call = partial(fn, params, k)
                values[name] = call()
                ms = time_ms(call, device, budget)
                peak = peak_extra_bytes(call, device)
                rows.append({"model": model, "elements": total, "k": k, "fraction": fraction, "method": name,
                             "ms": ms, "peak_bytes": peak, "value": values[name]})  # fmt: skip
                bar.update(1)
            for row in rows[-len(methods) :]:
                row["agrees"] = row["value"] == values["torch.kthvalue"]
        del params
        _free(device)
    bar.close()
    return rows


# ----------------------------------------------------------------------------------------- output
def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a header, the step table, the threshold table."""
    lines = rep.header_lines(report, "Kernel benchmark")
    lines += [
        "",
        f"Copy ceiling measured in this run: {report.get('copy_ceiling_GBps', float('nan')):.1f} GB/s "
        f"(`dst.copy_(src)`, bytes read + written). Sizes: `{report['size']}`, matrix `{report['matrix']}`, "
        f"{report.get('threads', '?')} torch threads.",
        "",
        "Providers: " + "; ".join(f"`{k}` {v}" for k, v in report["providers"].items()) + ".",
    ]
    if report.get("skipped_providers"):
        lines += ["", "Not run here: " + "; ".join(f"`{k}`: {v}" for k, v in report["skipped_providers"].items()) + "."]
    lines += [
        "",
        "Time is the median of one step; GB/s and the fraction of the ceiling are at the bytes the case must move "
        "in sparsetrain's format (the floor row); `xN` is the speedup over each peer (>1: faster). "
        "Peers do dense work whatever the mask: at 50% / 90% their dense time is reused (marked *).",
        "",
        "| model | step | dtype | sparsity | provider | time | GB/s | of ceiling | vs torch.optim | vs eager | "
        "vs compiled |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    previous = None
    for r in report["rows"]:
        case = (r["model"], r["algo"], r["dtype"], r["sparsity"], r["structure"])
        sparsity = "0%" if not r["sparsity"] else f"{r['sparsity']:.0%} {r['structure']}"
        prefix = f"| {r['model']} | {r['algo']} | {r['dtype']} | {sparsity} |"
        if case != previous:
            lines.append(f"{prefix} floor | {rep.fmt_ms(r['floor_ms'])} | {r['bytes_per_element']:.2f} B/elem | "
                         "100% | | | |")  # fmt: skip
            previous = case
        if "ms" not in r:
            lines.append(f"{prefix} {r['provider']} | skipped: {r['skipped']} | | | | | |")
            continue
        mark = "*" if r.get("reused_from_dense") else ""
        compile_note = f" (+{r['compile_s']:.1f} s compile)" if "compile_s" in r else ""
        speed = [f"x{r['speedup'][p]:.3g}" if p in r.get("speedup", {}) else "" for p in PEERS]
        lines.append(
            f"{prefix} {r['provider']} | {rep.fmt_ms(r['ms'])}{mark}{compile_note} | {r['GBps']:.3g} | "
            f"{rep.fmt_pct(r['of_ceiling'])} | " + " | ".join(speed) + " |"
        )
    if report.get("select"):
        lines += [
            "",
            "## Global magnitude threshold (k-th smallest |w| over all tensors)",
            "",
            "| model | elements | k | method | time | peak extra memory | same value as kthvalue |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in report["select"]:
            lines.append(
                f"| {r['model']} | {r['elements']:,} | {r['fraction']:.0%} | {r['method']} | {rep.fmt_ms(r['ms'])} | "
                f"{rep.fmt_bytes(r['peak_bytes'])} | {'yes' if r['agrees'] else 'NO'} |"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str) -> None:
    """Bar chart: time per provider for each dense case, the floor marked (one panel per case)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["model"], r["algo"], r["dtype"]) for r in report["rows"] if not r["sparsity"]))
    models_ = list(dict.fromkeys(k[0] for k in keys))
    variants = list(dict.fromkeys(k[1:] for k in keys))
    fig, axes = plt.subplots(
        len(models_), len(variants), figsize=(3.2 * len(variants), 2.8 * len(models_)), squeeze=False
    )
    names = list(report["providers"])
    colors = {name: plt.cm.tab10(i) for i, name in enumerate(names)}
    for i, model in enumerate(models_):
        for j, variant in enumerate(variants):
            ax = axes[i][j]
            rows = [r for r in report["rows"] if (r["model"], r["algo"], r["dtype"]) == (model, *variant)
                    and not r["sparsity"]]  # fmt: skip
            if not rows:
                ax.axis("off")
                continue
            timed = [r for r in rows if "ms" in r]
            ax.bar(range(len(timed)), [r["ms"] for r in timed], color=[colors[r["provider"]] for r in timed])
            ax.axhline(rows[0]["floor_ms"], color="black", linestyle="--", linewidth=1, label="floor")
            ax.set_xticks(range(len(timed)), [r["provider"].replace("sparsetrain", "st") for r in timed],
                          rotation=45, ha="right", fontsize=7)  # fmt: skip
            ax.set_yscale("log")
            ax.set_title(f"{model}\n{variant[0]} {variant[1]}", fontsize=8)
            ax.set_ylabel("ms per step", fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"One optimizer step with pruning, {report['device']} ({report['date'][:10]}); dashed: floor at "
                 f"{report['copy_ceiling_GBps']:.0f} GB/s", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def defaults(device: torch.device, quick: bool) -> tuple[str, str]:
    """(size, matrix) when none is given: quick for ``--quick``, full shapes and the full matrix on
    a GPU, the CPU sizes and the reduced matrix on a CPU."""
    if quick:
        return "quick", "quick"
    return ("full", "full") if device.type == "cuda" else ("cpu", "reduced")
