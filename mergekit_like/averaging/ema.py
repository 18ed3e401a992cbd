"""Exponential moving average, aware of the number of steps between snapshots."""

from __future__ import annotations

import math

import torch

from mergekit_like.averaging.base import RunningAverage
from mergekit_like.errors import HookUsageError


def decay_from_half_life(half_life: float) -> float:
    """The per-step decay under which a weight halves after ``half_life`` steps."""
    if not 0 < half_life < math.inf:
        raise ValueError(f"half_life must be positive and finite, got {half_life}")
    decay = 2 ** (-1 / half_life)
    if decay >= 1:
        raise ValueError(f"half_life {half_life:g} is too long: its per-step decay rounds to 1")
    return decay


class EMA(RunningAverage):
    """e = x_1; then e <- k e + (1 - k) x with k = decay ** (steps since the last snapshot).

    ``per_checkpoint`` treats every snapshot as one step (k = decay). The update
    is ``lerp(e, x, 1 - k)``, the same operation as torch's ``get_ema_multi_avg_fn``.
    """

    def __init__(
        self,
        decay: float | None = None,
        *,
        half_life: float | None = None,
        per_checkpoint: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(device)
        if decay is not None and half_life is None:
            self.decay = decay
        elif half_life is not None and decay is None:
            self.decay = decay_from_half_life(half_life)
        else:
            raise ValueError("give exactly one of decay and half_life")
        if not 0 <= self.decay < 1:  # NaN fails this test too
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        self.half_life = half_life
        self.per_checkpoint = per_checkpoint

    @property
    def label(self) -> str:
        return f"ema_hl{self.half_life:g}" if self.half_life is not None else f"ema_{self.decay:g}"

    def factor(self, step: int) -> float:
        """k for a snapshot at ``step`` after the previous one."""
        if self.last_step is None:
            raise HookUsageError("EMA.factor() needs a previous snapshot: call update() first")
        return self.decay if self.per_checkpoint else self.decay ** (step - self.last_step)

    def _fold(self, state: list[torch.Tensor], new: list[torch.Tensor], step: int) -> None:
        torch._foreach_lerp_(state, new, 1 - self.factor(step))
