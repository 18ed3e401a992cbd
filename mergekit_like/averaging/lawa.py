"""LAWA (latest weight averaging): the mean of the last k snapshots spaced nu steps apart."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

from mergekit_like.averaging.base import Snapshot, as_float32
from mergekit_like.averaging.swa import UniformMean


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


class LAWA:
    """Online LAWA: keeps the last ``k`` snapshots taken at least ``nu`` steps apart.

    ``result()`` is their uniform mean, computed in float32 by the same update
    as SWA. Snapshots are kept in float32 (k copies of the model).
    """

    def __init__(self, k: int = 5, nu: int = 0, *, device: torch.device | str | None = None) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.k = k
        self.nu = nu
        self.device = torch.device(device) if device is not None else None
        self.window: deque[tuple[int, dict[str, torch.Tensor]]] = deque(maxlen=k)
        self.last_step: int | None = None

    @property
    def label(self) -> str:
        return f"lawa_k{self.k}_nu{self.nu}"

    def accepts(self, step: int) -> bool:
        return not self.window or step - self.window[-1][0] >= self.nu

    @torch.no_grad()
    def update(self, snapshot: Snapshot, step: int) -> bool:
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"snapshot step {step} does not follow step {self.last_step}; steps must increase")
        self.last_step = step
        if not self.accepts(step):
            return False
        kept = {n: as_float32(t, self.device) if t.is_floating_point() else t.detach().clone()
                for n, t in snapshot.items()}
        self.window.append((step, kept))
        return True

    @property
    def ready(self) -> bool:
        return bool(self.window)

    @property
    def steps(self) -> list[int]:
        return [step for step, _ in self.window]

    def result(self) -> dict[str, torch.Tensor]:
        mean = UniformMean()
        for step, snapshot in self.window:
            mean.update(snapshot, step)
        return mean.result()
