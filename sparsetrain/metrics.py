"""Per-layer history over training, recorded without a host sync per step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .pruner import Target

METRICS = ("weight_sparsity", "dead_outputs", "dead_inputs")


class History:
    """Records, every ``every`` steps, each target's metrics as one device tensor ``[targets, 3]``.

    Values stay on the device until :meth:`as_dict` (one transfer for the whole history).
    """

    def __init__(self, targets: list[Target], every: int = 10, weight_of=None) -> None:
        if every < 1:
            raise ValueError(f"record_every must be >= 1, got {every}")
        self.targets, self.every = targets, every
        self.weight_of = weight_of  # target -> the weight the model uses (masked on the autograd path)
        self.names = [t.name for t in targets]
        self.steps: list[int] = []
        self.records: list[torch.Tensor] = []
        self.scalars: list[dict[str, float]] = []

    def record(self, step: int, scalars: dict[str, float] | None = None) -> None:
        """Append one record: every target's metrics now (device tensors) and the method's ``scalars``."""
        from .pruner import layer_metrics

        rows = []
        for t in self.targets:
            values = layer_metrics(t, self.weight_of(t) if self.weight_of is not None else None)
            rows.append(torch.stack([values[m] for m in METRICS]))
        self.steps.append(step)
        self.records.append(torch.stack(rows))
        self.scalars.append(dict(scalars or {}))

    def maybe_record(self, step: int, scalars: dict[str, float] | None = None) -> None:
        """:meth:`record` when ``step`` is a multiple of ``every``."""
        if step % self.every == 0:
            self.record(step, scalars)

    def as_dict(self) -> dict[str, Any]:
        """``{"step": [...], "layers": {name: {metric: [...]}}, "scalars": {key: [...]}}`` on the host."""
        table = torch.stack(self.records).cpu() if self.records else torch.zeros(0, len(self.names), len(METRICS))
        layers = {
            name: {m: table[:, i, j].tolist() for j, m in enumerate(METRICS)} for i, name in enumerate(self.names)
        }
        keys = sorted({k for s in self.scalars for k in s})
        scalars = {k: [s.get(k, float("nan")) for s in self.scalars] for k in keys}  # nan where not recorded
        return {"step": list(self.steps), "layers": layers, "scalars": scalars}

    def state_dict(self) -> dict[str, Any]:
        """The records (moved to the CPU), for checkpoints."""
        return {"steps": list(self.steps), "records": [r.cpu() for r in self.records], "scalars": list(self.scalars)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, on the targets' device."""
        device = self.targets[0].param.device
        self.steps = list(state["steps"])
        self.records = [r.to(device) for r in state["records"]]
        self.scalars = list(state["scalars"])
