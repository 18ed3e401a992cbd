"""The state-update interface shared by `mergekit-like average` and the training hook's sidecar.

An averager keeps float32 state for a stream of snapshots (tensor name ->
tensor) taken at increasing steps: ``update(snapshot, step)`` folds one in,
``result()`` returns the current average. Floating tensors are averaged in
float32 whatever their dtype (a bf16 average with decay 0.999 never moves);
integer and bool tensors (``num_batches_tracked``) are copied from the newest
snapshot, never averaged. Updates run under ``torch.no_grad()`` with foreach
ops, one kernel launch for the whole model rather than one per tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

Snapshot = Mapping[str, torch.Tensor]


def as_float32(tensor: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """A float32 copy (never a view of the snapshot, which the caller may reuse)."""
    return tensor.detach().to(device=device or tensor.device, dtype=torch.float32, copy=True)


class Averager(ABC):
    """Base of every averaging rule: float32 state, integer tensors from the newest snapshot."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self.state: dict[str, torch.Tensor] = {}
        self.copied: dict[str, torch.Tensor] = {}
        self.count = 0
        self.last_step: int | None = None

    @property
    def label(self) -> str:
        """A short name for this average (used to name its output directory)."""
        return type(self).__name__.lower()

    def accepts(self, step: int) -> bool:
        """Whether a snapshot at ``step`` would be folded in (SWA windows, LAWA spacing)."""
        return True

    @torch.no_grad()
    def update(self, snapshot: Snapshot, step: int) -> bool:
        """Folds in ``snapshot`` taken at ``step``; returns whether it was used."""
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"snapshot step {step} does not follow step {self.last_step}; steps must increase")
        if not self.accepts(step):
            return False
        floats = {n: t for n, t in snapshot.items() if t.is_floating_point()}
        for name, tensor in snapshot.items():
            if name not in floats:
                self.copied[name] = tensor.detach().to(self.device or tensor.device, copy=True)
        if floats:
            if not self.state:
                self.state = {n: as_float32(t, self.device) for n, t in floats.items()}
            else:
                names = list(self.state)
                if set(names) != set(floats):
                    raise ValueError("a snapshot must hold the same floating tensors as the first one")
                news = [as_float32(floats[n], self.device) for n in names]
                self._fold([self.state[n] for n in names], news, step)
        self.count += 1
        self.last_step = step
        return True

    @abstractmethod
    def _fold(self, state: list[torch.Tensor], new: list[torch.Tensor], step: int) -> None:
        """Updates ``state`` in place with the float32 tensors ``new`` (same order)."""

    def result(self) -> dict[str, torch.Tensor]:
        """The current average (float32) and the newest integer tensors."""
        return {**self.state, **self.copied}

    @property
    def ready(self) -> bool:
        return self.count > 0
