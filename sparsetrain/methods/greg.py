"""GReg-1 and GReg-2: growing L2 penalties on the groups to be pruned (Wang et al.).

Rules, as the official code (MingSun-Tse/Regularization-Pruning) states them, applied to coupled
channel groups (:mod:`sparsetrain.coupled`; one "layer" = one channel group, one "group" = one of
its channels with every slice that goes with it):

* pick, per channel group, the fraction ``target`` of channels with the smallest mean |w| over all
  their member slices: ``n = min(ceil(target * G), G - 1)``; GReg-1 picks at the start;
* every ``update_interval`` steps the picked channels' lam grows by ``delta`` (on every member
  slice: producer rows and bias, norm entries, consumer input slices); a layer stops growing
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
import warnings
from typing import Any

import torch

from ..contract import GROUP_LAM, GROUP_PRUNE
from ..validation import integer, number
from .base import Method, check_ratio


def _target_from(target: float | None, ratio: float | None, cls: str) -> float:
    """``target``, or the deprecated ``ratio`` spelling of it (one release)."""
    if ratio is not None:
        if target is not None:
            raise TypeError(f"{cls}: give target= only (ratio= is its deprecated spelling)")
        warnings.warn(f"{cls}(ratio=...) is deprecated; use target=", DeprecationWarning, stacklevel=3)
        return check_ratio("ratio", ratio)
    if target is None:
        raise TypeError(f"{cls} needs target= (the fraction of each channel group's channels to prune)")
    return check_ratio("target", target)


def check_structure(structure: str, cls: str) -> str:
    """ "filters" / "neurons" (output channels or features, whatever the weight layout) or "channels"."""
    if structure == "neurons":
        return "filters"
    if structure not in ("filters", "channels"):
        raise ValueError(
            f"{cls} prunes groups: structure must be 'filters', 'neurons' or 'channels', got {structure!r}"
        )
    return structure


class GReg1(Method):
    """GReg-1: grow an L2 penalty on the groups picked for pruning, then prune them.

    Wang, Qin, Zhang and Fu, "Neural Pruning via Growing Regularization" (ICLR 2021,
    arXiv:2012.09243), with the rules and defaults of the authors' official code:

    1. at the start, per layer (per coupled channel group), pick the fraction ``target`` of groups
       with the smallest mean ``|w|``: ``n = min(ceil(target * G), G - 1)``;
    2. every ``update_interval`` steps the picked groups' penalty ``lam`` grows by ``delta``; the
       fused step adds ``lam[j] * w`` to the gradient of every element of a picked group ``j``
       (kept groups get only the optimizer's weight decay). A layer stops growing when
       ``lam > ceiling`` or when the EMA (0.9 / 0.1) of ``mean|kept| / mean|picked|`` reaches
       ``mag_ratio_limit``;
    3. once every layer has stopped, ``lam`` is held for ``stabilize`` steps;
    4. then the picked groups are pruned (weights, bias, optimizer state) and training continues
       with the masks; :meth:`sparsetrain.Pruner.export` gives a physically smaller model.

    Args:
        target: fraction of each layer's groups to prune, in ``[0, 1)`` (at least one group is
            always kept). ``ratio`` is its deprecated spelling.
        structure: ``"filters"`` (default; alias ``"neurons"``: output channels / features, as
            coupled channel groups) or ``"channels"`` (input channels).
        update_interval: steps between two penalty updates (default ``5``; the paper uses 10 on
            CIFAR).
        delta: penalty increment per update (default ``1e-4``; short runs need larger values).
        ceiling: the penalty above which a layer stops growing (default ``1.0``).
        stabilize: steps the final penalty is held before pruning (default ``1000``).
        mag_ratio_limit: magnitude ratio at which a layer stops growing (default ``1000``).
        start: the first step of the method (default ``0``).

    Attributes:
        phase: ``"grow"``, ``"stabilize"`` or ``"pruned"`` (GReg-2 starts with ``"warm"``).
        pruned_at: the step at which the picked groups were pruned (``None`` before).

    Raises:
        ValueError: ``target`` outside ``[0, 1)``, an unknown ``structure``, ``update_interval < 1``,
            ``delta <= 0``, ``ceiling <= 0`` or ``stabilize < 0``; at ``Pruner`` creation, a layer
            with fewer than 2 groups.
    """

    uses_groups = True

    def __init__(
        self,
        target: float | None = None,
        *,
        ratio: float | None = None,
        structure: str = "filters",
        update_interval: int = 5,
        delta: float = 1e-4,
        ceiling: float = 1.0,
        stabilize: int = 1000,
        mag_ratio_limit: float = 1000.0,
        start: int = 0,
    ) -> None:
        self.target = _target_from(target, ratio, type(self).__name__)
        structure = check_structure(structure, "GReg")
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

    @property
    def ratio(self) -> float:
        """Deprecated spelling of :attr:`target`."""
        return self.target

    def check(self, targets) -> None:
        """Nothing to check per tensor: channel groups are checked when attached (at least 2 channels)."""

    def check_groups(self, groups) -> None:
        for g in groups.groups:
            if g.size < 2:
                raise ValueError(
                    f"layer {g.name!r} has {g.size} channel; GReg needs at least 2 (exclude it: exclude=[{g.name!r}])"
                )

    def attach(self, pruner) -> None:
        self.pick(pruner)

    # -- picking and growing
    def pick(self, pruner) -> None:
        scores = pruner.group_scores(mean=True)  # mean |w| over all member slices of each channel
        for g, score in zip(pruner.groups.groups, scores):
            n = min(math.ceil(g.ratio * g.size), g.size - 1)
            self.picked[g.name] = torch.topk(score, n, largest=False).indices.cpu()
            self.lam.setdefault(g.name, 0.0)
            self.ema[g.name] = None
            self.finished[g.name] = n == 0

    def _per_unit(self, pruner, picked_value, kept_value) -> list[torch.Tensor]:
        out = []
        for g in pruner.groups.groups:
            picked = picked_value[g.name] if isinstance(picked_value, dict) else picked_value
            values = torch.full((g.size,), kept_value, dtype=torch.float32)
            values[self.picked[g.name]] = picked
            out.append(values)
        return out

    def _write_lam(self, pruner) -> None:
        pruner.write_group_rows(GROUP_LAM, self._per_unit(pruner, self.lam, self.kept_lam()))

    def kept_lam(self) -> float:
        return 0.0

    def _magnitude_ratios(self, pruner) -> dict[str, float]:
        out = {}
        scores = pruner.group_scores(mean=True)
        for g, score in zip(pruner.groups.groups, scores):
            picked = torch.zeros(g.size, dtype=torch.bool)
            picked[self.picked[g.name]] = True
            picked = picked.to(score.device)
            if bool(picked.all()) or not bool(picked.any()):
                continue
            out[g.name] = (score[~picked].mean(), score[picked].mean().clamp(min=1e-30))
        values = torch.stack([k / p for k, p in out.values()]).tolist() if out else []  # one host read per update
        return dict(zip(out, values))

    def grow(self, pruner) -> None:
        ratios = self._magnitude_ratios(pruner)
        for g in pruner.groups.groups:
            name = g.name
            if self.finished[name]:
                continue
            self.lam[name] += self.delta
            ratio = ratios.get(name, math.inf)
            self.ratio_now[name] = ratio
            self.ema[name] = ratio if self.ema[name] is None else 0.9 * self.ema[name] + 0.1 * ratio
            if self.lam[name] > self.ceiling or self.ema[name] >= self.mag_ratio_limit:
                self.finished[name] = True
        self._write_lam(pruner)

    def prune(self, pruner, step: int) -> None:
        pruner.write_group_rows(GROUP_PRUNE, self._per_unit(pruner, 1.0, 0.0), "max")
        pruner.write_group_rows(GROUP_LAM, [torch.zeros(g.size) for g in pruner.groups.groups])
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
                self.ratio_now.update(self._magnitude_ratios(pruner))
            if self.stabilize_left <= 0:
                self.prune(pruner, step)
                self.phase = "pruned"
            self.stabilize_left -= 1

    def units_removed(self, pruner, removed: dict[str, list[int]]) -> None:
        """Renumber the picked channels after a shrink (picked channels that were removed are dropped)."""
        for name, gone in removed.items():
            if name in self.picked and gone:
                picked, gone_t = self.picked[name], torch.tensor(gone, dtype=torch.int64)
                stays = ~torch.isin(picked, gone_t)
                self.picked[name] = picked[stays] - (picked[stays, None] > gone_t[None, :]).sum(dim=1)

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
    """GReg-2: warm a penalty up on all groups, pick by magnitude, then grow it on the picked.

    Wang et al., "Neural Pruning via Growing Regularization" (ICLR 2021), GReg-2 with the official
    code's rules: ``lam`` grows on *all* groups by ``delta_all`` every ``update_interval`` steps
    until ``warm_ceiling``, so that the magnitudes come to reflect the groups' importance; then the
    groups are picked by magnitude as in :class:`GReg1`, the picked ones' ``lam`` grows as in
    GReg-1 and the kept ones are held at ``kept_lam`` (a small negative value lets them grow).

    Args:
        target: fraction of each layer's groups to prune, in ``[0, 1)``.
        delta_all: increment of the warm-up penalty on all groups (default ``1e-5``).
        warm_ceiling: warm-up penalty at which the groups are picked (default ``0.01``).
        kept_lam: penalty of the kept groups after picking (default ``-1e-4``).

    The other keyword arguments are :class:`GReg1`'s (``structure``, ``update_interval``,
    ``delta``, ``ceiling``, ``stabilize``, ``mag_ratio_limit``, ``start``; ``ratio`` is the
    deprecated spelling of ``target``).

    Raises:
        ValueError: as :class:`GReg1`, and ``delta_all <= 0`` or ``warm_ceiling <= 0``.
    """

    def __init__(
        self,
        target: float | None = None,
        *,
        delta_all: float = 1e-5,
        warm_ceiling: float = 0.01,
        kept_lam: float = -1e-4,
        **kw,
    ) -> None:
        super().__init__(target, **kw)
        self.delta_all = number("delta_all", delta_all, low=0.0, strict_low=True)
        self.warm_ceiling = number("warm_ceiling", warm_ceiling, low=0.0, strict_low=True)
        self._kept_lam = number("kept_lam", kept_lam)
        self.phase = "warm"
        self.warm_lam = 0.0

    def attach(self, pruner) -> None:
        for g in pruner.groups.groups:
            self.lam[g.name] = 0.0

    def kept_lam(self) -> float:
        return self._kept_lam

    def before_step(self, pruner, step: int) -> None:
        if step < self.start or self.phase != "warm":
            return super().before_step(pruner, step)
        if (step - self.start) % self.update_interval == 0:
            self.warm_lam += self.delta_all
            pruner.write_group_rows(GROUP_LAM, [torch.full((g.size,), self.warm_lam) for g in pruner.groups.groups])
            if self.warm_lam >= self.warm_ceiling:
                self.pick(pruner)
                for g in pruner.groups.groups:
                    self.lam[g.name] = self.warm_lam
                self._write_lam(pruner)
                self.phase = "grow"

    def scalars(self) -> dict[str, float]:
        out = super().scalars()
        if self.phase == "warm":
            out.update({f"lam/{name}": self.warm_lam for name in self.lam})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "warm_lam": self.warm_lam}
