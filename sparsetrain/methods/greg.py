"""GReg-1 and GReg-2: growing L2 penalties on the groups to be pruned (Wang et al.).

Rules, as the official code (MingSun-Tse/Regularization-Pruning) states them:

* pick, per layer, the fraction ``ratio`` of groups with the smallest mean |w|:
  ``n = min(ceil(ratio * G), G - 1)``; GReg-1 picks at the start;
* every ``update_interval`` steps the picked groups' lam grows by ``delta``; a layer stops growing
  when lam exceeds ``ceiling`` or when the EMA (0.9 / 0.1) of mean|kept| / mean|picked| reaches
  ``mag_ratio_limit``;
* once every layer has stopped, lam is held for ``stabilize`` steps, then the picked groups are
  pruned (weights, bias, optimizer state) and training continues with the masks;
* GReg-2 first grows lam on all groups by ``delta_all`` until ``warm_ceiling``, then picks by
  magnitude, then grows the picked as GReg-1 and holds the kept at ``kept_lam``.

Kept groups get only ordinary weight decay. The penalty lam[j] * w is applied inside the fused step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..contract import GROUP_LAM, GROUP_PRUNE
from ..selection import group_scores
from ..validation import integer, number
from .base import Method, check_ratio


class GReg1(Method):
    uses_groups = True

    def __init__(
        self,
        ratio: float,
        *,
        structure: str = "filters",
        update_interval: int = 5,
        delta: float = 1e-4,
        ceiling: float = 1.0,
        stabilize: int = 1000,
        mag_ratio_limit: float = 1000.0,
        start: int = 0,
    ) -> None:
        self.target = check_ratio("ratio", ratio)
        if structure not in ("filters", "channels"):
            raise ValueError(f"GReg prunes groups: structure must be 'filters' or 'channels', got {structure!r}")
        self.structure = structure
        self.update_interval = integer("update_interval", update_interval, low=1)
        self.delta = number("delta", delta, low=0.0, strict_low=True)
        self.ceiling = number("ceiling", ceiling, low=0.0, strict_low=True)
        self.stabilize = integer("stabilize", stabilize, low=0)
        self.mag_ratio_limit = number("mag_ratio_limit", mag_ratio_limit, low=0.0, strict_low=True, finite=False)
        self.start = integer("start", start, low=0)
        self.phase = "grow"
        self.picked: dict[str, torch.Tensor] = {}
        self.lam: dict[str, float] = {}
        self.ema: dict[str, float | None] = {}
        self.finished: dict[str, bool] = {}
        self.ratio_now: dict[str, float] = {}
        self.stabilize_left = stabilize
        self.pruned_at: int | None = None

    def check(self, targets) -> None:
        for t in targets:
            if t.groups < 2:
                raise ValueError(f"{t.name} has {t.groups} {self.structure}; GReg needs at least 2 groups")

    def attach(self, pruner) -> None:
        self.pick(pruner)

    # -- picking and growing
    def pick(self, pruner) -> None:
        for t in pruner.targets:
            scores = group_scores(t.param, self.structure, 1.0) / t.inner  # mean |w| per group
            n = min(math.ceil(t.ratio * t.groups), t.groups - 1)
            self.picked[t.name] = torch.topk(scores, n, largest=False).indices.cpu()
            self.lam.setdefault(t.name, 0.0)
            self.ema[t.name] = None
            self.finished[t.name] = n == 0

    def _write_lam(self, pruner, t, picked_lam: float, kept_lam: float) -> None:
        lam = torch.full((t.groups,), kept_lam, dtype=torch.float32)
        lam[self.picked[t.name]] = picked_lam
        pruner.optimizer.state[t.param]["group_coefs"][GROUP_LAM].copy_(lam)

    def kept_lam(self) -> float:
        return 0.0

    def _magnitude_ratio(self, t) -> float:
        scores = group_scores(t.param, self.structure, 1.0)
        picked = torch.zeros(t.groups, dtype=torch.bool)
        picked[self.picked[t.name]] = True
        picked = picked.to(scores.device)
        kept_mean, picked_mean = scores[~picked].mean(), scores[picked].mean()
        return float(kept_mean / picked_mean.clamp(min=1e-30))  # one host read per layer per update

    def grow(self, pruner) -> None:
        for t in pruner.targets:
            name = t.name
            if self.finished[name]:
                continue
            self.lam[name] += self.delta
            self._write_lam(pruner, t, self.lam[name], self.kept_lam())
            ratio = self._magnitude_ratio(t)
            self.ratio_now[name] = ratio
            self.ema[name] = ratio if self.ema[name] is None else 0.9 * self.ema[name] + 0.1 * ratio
            if self.lam[name] > self.ceiling or self.ema[name] >= self.mag_ratio_limit:
                self.finished[name] = True

    def prune(self, pruner, step: int) -> None:
        for t in pruner.targets:
            flags = torch.zeros(t.groups, dtype=torch.float32)
            flags[self.picked[t.name]] = 1.0
            for table in pruner.group_coefs(t):
                table[GROUP_PRUNE].copy_(flags)
                table[GROUP_LAM].zero_()
        pruner.optimizer.schedule_pruning("group")
        self.pruned_at = step

    def before_step(self, pruner, step: int) -> None:
        if step < self.start:
            return
        if self.phase == "grow":
            if (step - self.start) % self.update_interval == 0:
                self.grow(pruner)
            if all(self.finished.values()):
                self.phase = "stabilize"
        elif self.phase == "stabilize":
            if (step - self.start) % self.update_interval == 0:  # keep the ratio's history going while lam is held
                for t in pruner.targets:
                    self.ratio_now[t.name] = self._magnitude_ratio(t)
            if self.stabilize_left <= 0:
                self.prune(pruner, step)
                self.phase = "pruned"
            self.stabilize_left -= 1

    def scalars(self) -> dict[str, float]:
        out = {}
        if self.phase == "pruned":  # picked groups are gone: nothing left to regularize or compare
            return out
        for name, lam in self.lam.items():
            out[f"lam/{name}"] = lam
            if name in self.ratio_now:
                out[f"mag_ratio/{name}"] = self.ratio_now[name]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in ("phase", "picked", "lam", "ema", "finished", "ratio_now", "stabilize_left", "pruned_at")
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class GReg2(GReg1):
    """GReg-2: warm up lam on all groups, pick by magnitude, grow the picked, hold kept at ``kept_lam``."""

    def __init__(
        self, ratio: float, *, delta_all: float = 1e-5, warm_ceiling: float = 0.01, kept_lam: float = -1e-4, **kw
    ) -> None:
        super().__init__(ratio, **kw)
        self.delta_all = number("delta_all", delta_all, low=0.0, strict_low=True)
        self.warm_ceiling = number("warm_ceiling", warm_ceiling, low=0.0, strict_low=True)
        self._kept_lam = number("kept_lam", kept_lam)
        self.phase = "warm"
        self.warm_lam = 0.0

    def attach(self, pruner) -> None:
        for t in pruner.targets:
            self.lam[t.name] = 0.0

    def kept_lam(self) -> float:
        return self._kept_lam

    def before_step(self, pruner, step: int) -> None:
        if step < self.start or self.phase != "warm":
            return super().before_step(pruner, step)
        if (step - self.start) % self.update_interval == 0:
            self.warm_lam += self.delta_all
            for t in pruner.targets:
                pruner.optimizer.state[t.param]["group_coefs"][GROUP_LAM].fill_(self.warm_lam)
            if self.warm_lam >= self.warm_ceiling:
                self.pick(pruner)
                for t in pruner.targets:
                    self.lam[t.name] = self.warm_lam
                    self._write_lam(pruner, t, self.warm_lam, self._kept_lam)
                self.phase = "grow"

    def scalars(self) -> dict[str, float]:
        out = super().scalars()
        if self.phase == "warm":
            out.update({f"lam/{name}": self.warm_lam for name in self.lam})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "warm_lam": self.warm_lam}
