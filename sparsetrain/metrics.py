"""Per-layer history over training, recorded without a host sync per step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .pruner import Target

METRICS = ("weight_sparsity", "dead_outputs", "dead_inputs")
HISTORY_LIMIT = 1024  # records kept at most; then every other one is dropped and the interval doubles


def output_major(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` (``module``'s weight, or a tensor laid out like it) seen with the module's outputs along dim 0 and
    its inputs (per group) along dim 1, as ``nn.Linear`` / ``nn.Conv2d`` store them: transformers' ``Conv1D``
    keeps ``[in, out]``, ``nn.ConvTranspose*d`` ``[in, out / groups, *kernel]``. Other tensors as they are."""
    if x.dim() < 2:
        return x
    if hasattr(module, "nf"):  # transformers' Conv1D
        return x.transpose(0, 1)
    if getattr(module, "transposed", False):
        groups, rest = module.groups, x.shape[2:]
        per_group = x.reshape(groups, x.shape[0] // groups, x.shape[1], *rest).transpose(1, 2)
        return per_group.reshape(groups * x.shape[1], x.shape[0] // groups, *rest)
    return x


class History:
    """Records, every ``every`` steps, each target's metrics as one device tensor ``[targets, 3]``.

    Values stay on the device until :meth:`as_dict` (one transfer for the whole history). The
    history is bounded: when it holds ``limit`` records (default :data:`HISTORY_LIMIT`), it keeps
    those on a grid twice as coarse (every other one) and records half as often from then on, so a
    run of any length keeps between ``limit / 2`` and ``limit`` records spread over all of it, and
    its state_dict stops growing.
    """

    def __init__(self, targets: list[Target], every: int = 10, weight_of=None, limit: int = HISTORY_LIMIT) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"record_every must be an integer >= 1, got {every!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 2:
            raise ValueError(f"the history limit must be an integer >= 2, got {limit!r}")
        self.targets, self.every, self.limit = targets, every, limit
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
        if len(self.records) >= self.limit:
            self._thin()

    def _thin(self) -> None:
        """Keep the records on the grid of twice the interval (every other one) and record half as often."""
        self.every *= 2
        keep = [i for i, s in enumerate(self.steps) if s % self.every == 0]
        if len(keep) > self.limit // 2:  # records off the grid (explicit record() calls): every other one
            keep = list(range(1, len(self.steps), 2))
        self.steps = [self.steps[i] for i in keep]
        self.records = [self.records[i] for i in keep]
        self.scalars = [self.scalars[i] for i in keep]

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
        """The records (moved to the CPU) and the recording interval, for checkpoints."""
        return {
            "steps": list(self.steps),
            "records": [r.cpu() for r in self.records],
            "scalars": list(self.scalars),
            "every": self.every,
        }

    def check_state_dict(self, state: Any) -> None:
        """Raise a clear error if ``state`` is not a history of these targets (nothing is changed)."""
        if not isinstance(state, dict) or not {"steps", "records", "scalars"} <= state.keys():
            raise ValueError("history state must be a dict with 'steps', 'records' and 'scalars'")
        steps, records, scalars = state["steps"], state["records"], state["scalars"]
        if not (len(steps) == len(records) == len(scalars)):
            raise ValueError(f"history state: {len(steps)} steps, {len(records)} records, {len(scalars)} scalars")
        if len(records) > self.limit:
            raise ValueError(f"history state holds {len(records)} records, more than the limit {self.limit}")
        shape = (len(self.targets), len(METRICS))
        for r in records:
            if not isinstance(r, torch.Tensor) or tuple(r.shape) != shape or not r.is_floating_point():
                got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
                raise ValueError(f"history state: a record is {got}, expected a float tensor of shape {shape}")
        every = state.get("every", self.every)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"history state: 'every' must be an integer >= 1, got {every!r}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, on the targets' device (checked whole first)."""
        self.check_state_dict(state)
        device = self.targets[0].param.device
        self.steps = list(state["steps"])
        self.records = [r.to(device) for r in state["records"]]
        self.scalars = list(state["scalars"])
        self.every = state.get("every", self.every)
