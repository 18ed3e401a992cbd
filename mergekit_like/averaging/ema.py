"""Exponential moving average, aware of the number of steps between snapshots, with an optional warm-up."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from mergekit_like.averaging.base import RunningAverage, Snapshot, StateDict, step_number
from mergekit_like.errors import HookUsageError

WARMUPS = ("inv_gamma",)


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

    ``warmup="inv_gamma"``: the decay of the n-th step since the average started is
    ``clamp(1 - (1 + n / inv_gamma) ** -power, min_decay, decay)`` (the schedule of timm,
    ema-pytorch and Composer), so the average does not drag the random start along; k is the
    product of the steps' decays since the last snapshot (per checkpoint: the n-th snapshot's).
    ``start_step``: snapshots before it are ignored; the first one from it starts the average,
    as ema-pytorch's ``update_after_step = start_step - 1`` copies the model until then.
    """

    def __init__(
        self,
        decay: float | None = None,
        *,
        half_life: float | None = None,
        per_checkpoint: bool = False,
        warmup: str | None = None,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        min_decay: float = 0.0,
        start_step: int | None = None,
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
        _check_warmup(warmup, inv_gamma, power, min_decay, self.decay)
        self.half_life = half_life
        self.per_checkpoint = per_checkpoint
        self.warmup = warmup
        self.inv_gamma, self.power, self.min_decay = inv_gamma, power, min_decay
        self.start_step = start_step
        self.first_step: int | None = None  # the step the average started at (the warm-up counts from it)

    @property
    def label(self) -> str:
        label = f"ema_hl{self.half_life:g}" if self.half_life is not None else f"ema_{self.decay:g}"
        if self.warmup is not None:
            label += f"_warmup{self.inv_gamma:g}-{self.power:g}"
        return label + (f"_from{self.start_step}" if self.start_step is not None else "")

    def accepts(self, step: int) -> bool:
        return self.start_step is None or step >= self.start_step

    def step_decay(self, since_start: int) -> float:
        """The decay of the step ``since_start`` steps after the average started."""
        if self.warmup is None:
            return self.decay
        if since_start <= 0:
            return 0.0
        value = 1 - (1 + since_start / self.inv_gamma) ** -self.power
        return min(max(value, self.min_decay), self.decay)

    def factor(self, step: int) -> float:
        """k for a snapshot at ``step`` after the previous one."""
        if self.last_step is None:
            raise HookUsageError("EMA.factor() needs a previous snapshot: call update() first")
        if self.warmup is None:
            return self.decay if self.per_checkpoint else self.decay ** (step - self.last_step)
        assert self.first_step is not None  # set with the first snapshot, or refused on loading without it
        if self.per_checkpoint:
            return self.step_decay(self.count)
        return math.prod(self.step_decay(s - self.first_step) for s in range(self.last_step + 1, step + 1))

    def update(self, snapshot: Snapshot, step: int) -> bool:
        starting = self.count == 0
        used = super().update(snapshot, step)
        if used and starting:
            self.first_step = step
        return used

    def _begin_fold(self, step: int) -> float:
        return 1 - self.factor(step)

    def _fold(self, names: list[str], state: list[torch.Tensor], new: list[torch.Tensor], weight: float) -> None:
        torch._foreach_lerp_(state, new, weight)

    def state_dict(self) -> StateDict:
        return {**super().state_dict(), "first_step": self.first_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        # States saved before the warm-up existed lack it; only a warm-up needs it.
        first = step_number(state.get("first_step"), "first_step")
        if first is None and self.count > 0 and self.warmup is not None:
            raise ValueError("the state does not say at which step the average started, which the warm-up needs")
        self.first_step = first


def _check_warmup(warmup: str | None, inv_gamma: float, power: float, min_decay: float, decay: float) -> None:
    if warmup is not None and warmup not in WARMUPS:
        raise ValueError(f"warmup must be one of {', '.join(WARMUPS)} or None, not {warmup!r}")
    if not 0 < inv_gamma < math.inf:
        raise ValueError(f"inv_gamma must be positive and finite, got {inv_gamma}")
    if not 0 < power < math.inf:
        raise ValueError(f"power must be positive and finite, got {power}")
    if not 0 <= min_decay <= decay:
        raise ValueError(f"min_decay must be in [0, decay = {decay:g}], got {min_decay}")
