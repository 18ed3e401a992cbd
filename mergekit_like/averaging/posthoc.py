"""Post-hoc EMA (EDM2, Karras et al. 2024): choose the EMA length after training.

During training :class:`PostHocEMA` tracks a few power-function EMAs (two relative widths,
``sigma_rels``) and every ``snapshot_every`` steps stores each one, in float16 by default, as
EDM2 does. Any other power-function EMA at any stored time is then close to a linear
combination of the stored snapshots: the profiles are functions of the training time,
``p_(t,g)(tau) = (g + 1) tau^g / t^(g + 1)`` on [0, t], and the combination whose profile is
nearest the wanted one in L2 has the weights ``x`` solving ``A x = b``, with ``A`` the stored
profiles' inner products and ``b`` theirs with the wanted one (EDM2's Algorithm 3, solved by
least squares in float64). How far the combined profile stays from the wanted one, relative to
its norm, is the reconstruction error reported for each length.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergekit_like.averaging.base import (
    Averager,
    Snapshot,
    StateDict,
    StoredSnapshot,
    pack_groups,
    step_number,
    unpack_groups,
)
from mergekit_like.averaging.power_ema import PowerEMA, gamma_to_sigma_rel, sigma_rel_to_gamma
from mergekit_like.errors import InvalidCheckpointError
from mergekit_like.io.sidefiles import read_json_object

# Written beside each stored snapshot's weights: its step and profile.
SNAPSHOT_INFO = "power_ema.json"
SNAPSHOTS_DIR = "snapshots"
DEFAULT_SIGMA_RELS = (0.05, 0.10)  # EDM2's
# A reconstruction whose profile is further than this from the wanted one (relative L2) is warned about.
WARN_ERROR = 0.05


class PostHocEMA(Averager):
    """Power-function EMAs of each width in ``sigma_rels``, stored every ``snapshot_every`` steps.

    ``result()`` is the first width's average (usable as it is); the stored snapshots are what
    ``mergekit-like average DIR --method phema`` reconstructs other widths from.
    """

    def __init__(self, sigma_rels: Sequence[float] = DEFAULT_SIGMA_RELS, *, snapshot_every: int = 1000,
                 dtype: torch.dtype = torch.float16, device: torch.device | str | None = None) -> None:
        super().__init__(device)
        if len(sigma_rels) < 2 or len(set(sigma_rels)) != len(sigma_rels):
            raise ValueError(f"post-hoc EMA needs at least two different sigma_rels, not {list(sigma_rels)}")
        if snapshot_every < 1:
            raise ValueError(f"snapshot_every must be at least 1, got {snapshot_every}")
        if not dtype.is_floating_point:
            raise ValueError(f"the stored snapshots need a floating dtype, not {dtype}")
        self.profiles = [PowerEMA(s, device=device) for s in sigma_rels]
        self.sigma_rels = tuple(sigma_rels)
        self.snapshot_every = snapshot_every
        self.dtype = dtype
        self.stored_step: int | None = None  # the step of the newest stored snapshots

    @property
    def label(self) -> str:
        return "posthoc_ema_" + "_".join(f"{s:g}" for s in self.sigma_rels)

    @property
    def ready(self) -> bool:
        return self.profiles[0].ready

    def update(self, snapshot: Snapshot, step: int) -> bool:
        self._check_step(step)
        for profile in self.profiles:
            profile.device = self.device  # the sidecar sets this averager's device after making it
            profile.update(snapshot, step)
        self.last_step = step
        return True

    def result(self) -> dict[str, torch.Tensor]:
        return self.profiles[0].result()

    def stored_snapshots(self, *, final: bool = False) -> list[StoredSnapshot]:
        """The snapshots due now (a multiple of ``snapshot_every`` crossed; ``final``: any not yet stored)."""
        step = self.last_step
        if step is None or step == self.stored_step:
            return []
        crossed = step // self.snapshot_every > (self.stored_step or 0) // self.snapshot_every
        if not (crossed or final):
            return []
        self.stored_step = step
        return [StoredSnapshot(f"{SNAPSHOTS_DIR}/{p.label}/step_{step}", p.result(), self.dtype, SNAPSHOT_INFO,
                               {"step": step, "gamma": p.gamma, "sigma_rel": gamma_to_sigma_rel(p.gamma)})
                for p in self.profiles]

    def state_dict(self) -> StateDict:
        groups = [(p.last_step, {**p.state, **p.copied}) for p in self.profiles] if self.ready else []
        return {"last_step": self.last_step, "count": self.profiles[0].count, "stored_step": self.stored_step,
                **pack_groups(groups)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        groups = unpack_groups(state, self.device)
        if groups and len(groups) != len(self.profiles):
            raise ValueError(f"the state holds {len(groups)} profiles, not {len(self.profiles)}")
        count = state["count"]
        if not isinstance(count, int) or isinstance(count, bool) or count < 0 or (count > 0) != bool(groups):
            raise ValueError(f"'count' {count!r} does not match the {len(groups)} group(s) of tensors")
        last_step = step_number(state["last_step"], "last_step")
        for index, profile in enumerate(self.profiles):
            profile._restore(groups[index][1] if groups else {}, count, last_step)
        self.last_step = last_step
        self.stored_step = step_number(state.get("stored_step"), "stored_step")


# -- reconstruction -----------------------------------------------------------------------------


def profile_dot(t_a: np.ndarray | float, g_a: np.ndarray | float, t_b: np.ndarray | float,
                g_b: np.ndarray | float) -> Any:
    """<p_(t_a, g_a), p_(t_b, g_b)>: the integral over [0, min(t_a, t_b)] of the two profiles' product.

    That is (g_a+1)(g_b+1)/(g_a+g_b+1) t_min^(g_a+g_b+1) / (t_a^(g_a+1) t_b^(g_b+1)), written with the
    ratio t_min / t_max so that no power of a step overflows (t^(g+1) does for long runs and large g).
    """
    t_min, t_max = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    longer_gamma = np.where(np.less(t_a, t_b), g_b, g_a)  # the exponent of the profile that runs longer
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * (t_min / t_max) ** longer_gamma / t_max


@dataclass(frozen=True)
class Reconstruction:
    """The weights of the stored snapshots for one wanted profile, and how close their sum comes to it."""

    sigma_rel: float
    step: int
    weights: tuple[float, ...]  # one per stored snapshot, in the order given
    error: float  # ||p_wanted - sum_i w_i p_i|| / ||p_wanted||


def reconstruct(steps: Sequence[int], gammas: Sequence[float], sigma_rel: float, step: int) -> Reconstruction:
    """EDM2's least-squares weights of snapshots (``steps``, ``gammas``) for width ``sigma_rel`` at ``step``."""
    if not steps:
        raise ValueError("no stored snapshots to reconstruct from")
    if min(steps) <= 0:
        raise ValueError(f"stored snapshots need steps after 0, not {min(steps)}")
    t = np.asarray(steps, dtype=np.float64)
    g = np.asarray(gammas, dtype=np.float64)
    wanted = sigma_rel_to_gamma(sigma_rel)
    a = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_dot(t, g, float(step), wanted)
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    norm = float(profile_dot(float(step), wanted, float(step), wanted))
    missed = max(norm - 2 * float(x @ b) + float(x @ a @ x), 0.0)
    return Reconstruction(sigma_rel, step, tuple(float(w) for w in x), math.sqrt(missed / norm))


@dataclass(frozen=True)
class SnapshotFile:
    """A stored snapshot found on disk."""

    path: Path
    step: int
    gamma: float


def find_snapshots(directory: str | Path) -> list[SnapshotFile]:
    """Every stored snapshot under ``directory`` (a hook's output directory, or one of its averages)."""
    found = [read_snapshot_info(info.parent) for info in Path(directory).rglob(SNAPSHOT_INFO)]
    return sorted(found, key=lambda s: (s.step, s.gamma))


def read_snapshot_info(path: Path) -> SnapshotFile:
    """The step and profile of the stored snapshot in directory ``path``; one clear error if unreadable."""
    info = path / SNAPSHOT_INFO
    fix = "point at a directory written by the hook's PostHocEMA"
    data = read_json_object(info, "stored snapshot's description", fix)
    step, gamma = data.get("step"), data.get("gamma")
    if not isinstance(step, int) or isinstance(step, bool) or step <= 0:
        raise InvalidCheckpointError(f"'step' must be a step after 0, not {step!r}", path=info, fix=fix)
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not 0 <= gamma < math.inf:
        raise InvalidCheckpointError(f"'gamma' must be a number >= 0, not {gamma!r}", path=info, fix=fix)
    return SnapshotFile(path, step, float(gamma))


class FixedCombination(Averager):
    """sum_i w_i x_i over the snapshots in the order given (steps may repeat), accumulated in float64."""

    def __init__(self, weights: Sequence[float], label: str = "combination") -> None:
        super().__init__(None)
        self.weights = list(weights)
        self.seen = 0
        self.sum: dict[str, torch.Tensor] = {}
        self.copied: dict[str, torch.Tensor] = {}
        self._label = label

    @property
    def label(self) -> str:
        return self._label

    @property
    def ready(self) -> bool:
        return self.seen > 0

    @torch.no_grad()
    def update(self, snapshot: Snapshot, step: int) -> bool:
        weight = self.weights[self.seen]
        for name, tensor in snapshot.items():
            if not tensor.is_floating_point():
                self.copied[name] = tensor.clone()
            elif name in self.sum:
                self.sum[name].add_(tensor.double(), alpha=weight)
            else:
                self.sum[name] = tensor.double() * weight
        self.seen += 1
        self.last_step = step
        return True

    def result(self) -> dict[str, torch.Tensor]:
        return {**{n: t.float() for n, t in self.sum.items()}, **self.copied}

    def state_dict(self) -> StateDict:
        raise NotImplementedError("a fixed combination is computed in one pass and never resumed")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError("a fixed combination is computed in one pass and never resumed")
