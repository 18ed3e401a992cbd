"""LAWA (latest weight averaging): the mean of the latest k snapshots spaced nu steps apart.

One rule, :func:`lawa_selection`, chooses the snapshots for the offline command and
for the online :class:`LAWA` alike: newest first, each next one the newest taken at
least ``nu`` steps before the one chosen last.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from mergekit_like.averaging.base import (
    Averager,
    Snapshot,
    StateDict,
    as_float32,
    kept_copy,
    pack_groups,
    step_number,
    unpack_groups,
)
from mergekit_like.averaging.swa import fold_mean


def lawa_selection(steps: Sequence[int], k: int, nu: int = 0) -> list[int]:
    """Indices of the last ``k`` checkpoints spaced at least ``nu`` steps apart, newest backwards.

    Returned oldest first. ``steps`` must increase.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    chosen: list[int] = []
    for index in range(len(steps) - 1, -1, -1):
        if not chosen or steps[chosen[-1]] - steps[index] >= nu:
            chosen.append(index)
            if len(chosen) == k:
                break
    return chosen[::-1]


class MeanOf(Mapping[str, torch.Tensor]):
    """The uniform mean of snapshots (oldest first), one tensor at a time as each name is read.

    Floating tensors: the running mean in float32 by :func:`fold_mean`, as SWA and the offline
    command compute it; the others: the newest snapshot's. Reading a name computes a new tensor, so
    a writer that streams the names holds one tensor of the mean, never a copy of the model.
    """

    def __init__(self, snapshots: Sequence[Mapping[str, torch.Tensor]]) -> None:
        self.snapshots = snapshots
        self._names: Mapping[str, torch.Tensor] = snapshots[-1] if snapshots else {}  # no snapshots: no names

    def __getitem__(self, name: str) -> torch.Tensor:
        tensors = [snapshot[name] for snapshot in self.snapshots]
        if not tensors[-1].is_floating_point():
            return tensors[-1].clone()
        mean = as_float32(tensors[0])
        for count, tensor in enumerate(tensors[1:], 1):
            fold_mean([mean], [as_float32(tensor)], count)
        return mean

    def __contains__(self, name: object) -> bool:
        return name in self._names  # without computing the mean

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class LAWA(Averager):
    """Online LAWA: ``result()`` is the uniform mean of :func:`lawa_selection` over the snapshots.

    It keeps every snapshot that a later selection could still choose. The chosen chain
    (the newest snapshot, then the newest at least ``nu`` steps before it, ...) only moves
    forward as snapshots arrive, so once it has ``k`` members every snapshot older than
    the k-th can go; while it has fewer, none can. Memory is therefore about
    ``(k - 1) * nu / snapshot_every + 1`` float32 copies of the model: snapshot every
    ``nu`` steps to keep ``k``. The mean is computed in float32 by the same update, in
    the same order (oldest first), as SWA and the offline command.
    """

    def __init__(self, k: int = 5, nu: int = 0, *, start_step: int | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(device)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if nu < 0:
            raise ValueError(f"nu must be at least 0, got {nu}")
        self.k = k
        self.nu = nu
        self.start_step = start_step  # snapshots before it are never averaged
        self.kept: list[tuple[int, dict[str, torch.Tensor]]] = []  # (step, snapshot), oldest first

    @property
    def label(self) -> str:
        return f"lawa_k{self.k}_nu{self.nu}" + (f"_from{self.start_step}" if self.start_step is not None else "")

    @property
    def ready(self) -> bool:
        return bool(self.kept)

    @property
    def steps(self) -> list[int]:
        """The steps of the snapshots kept."""
        return [step for step, _ in self.kept]

    @property
    def chosen_steps(self) -> list[int]:
        """The steps of the snapshots ``result()`` averages, oldest first."""
        steps = self.steps
        return [steps[i] for i in lawa_selection(steps, self.k, self.nu)]

    @torch.no_grad()
    def update(self, snapshot: Snapshot, step: int) -> bool:
        self._check_step(step)
        if not self.accepts(step):
            return False
        # Drop what the selection with this snapshot no longer reaches before copying it: k copies held, not k + 1.
        self._drop_unreachable([*self.steps, step])
        self.kept.append((step, kept_copy(snapshot, self.device)))
        self.last_step = step
        return True

    def accepts(self, step: int) -> bool:
        return self.start_step is None or step >= self.start_step

    def _drop_unreachable(self, steps: list[int] | None = None) -> None:
        """Drops the kept snapshots older than the k-th chosen of ``steps`` (the kept ones, perhaps with
        one more to come at the end)."""
        chosen = lawa_selection(self.steps if steps is None else steps, self.k, self.nu)
        if len(chosen) == self.k:
            del self.kept[: chosen[0]]

    def result(self) -> Mapping[str, torch.Tensor]:
        """The mean of the chosen snapshots, computed a tensor at a time as it is read (see :class:`MeanOf`)."""
        return MeanOf([self.kept[i][1] for i in lawa_selection(self.steps, self.k, self.nu)])

    def result_copy(self) -> dict[str, torch.Tensor]:
        return dict(self.result())  # every tensor of the mean is new already

    def state_dict(self) -> StateDict:
        return {"last_step": self.last_step, **pack_groups(self.kept)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        kept = unpack_groups(state, self.device)
        steps = [step for step, _ in kept]
        if steps != sorted(set(steps)):
            raise ValueError(f"the snapshots of a LAWA state must have increasing steps, not {steps}")
        recorded = step_number(state.get("last_step"), "last_step")
        self.kept = kept
        # A state saved by the greedy rule of old may have seen a later snapshot than it kept.
        self.last_step = max([*steps, *([recorded] if recorded is not None else [])], default=None)
        # A state saved under another rule may keep more than this one needs.
        self._drop_unreachable()
