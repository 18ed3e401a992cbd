"""EDM2's power-function EMA (Karras et al., 2024): an average whose length is relative to training time.

At step t the average weighs the weights of step tau by p(tau) ~ tau^gamma on [0, t]: its width
relative to t, ``sigma_rel``, stays the same however long training runs (a fixed-decay EMA
forgets ever more of the run). Tracked online, one step at a time:

    e_t = beta_t e_{t-1} + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(gamma + 1)

and with a snapshot only every few steps, each snapshot standing for the steps since the last,
``beta = (t_prev / t)^(gamma + 1)`` (EDM2's ``t_delta``): the same product of per-step betas.
The first snapshot stands for every step before it. So the weight of the snapshot at step s_k
is ``(s_k^(gamma+1) - s_(k-1)^(gamma+1)) / t^(gamma+1)`` with s_0 = 0, the closed form the
tests check.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mergekit_like.averaging.base import RunningAverage, Snapshot

PAPER = "https://arxiv.org/abs/2312.02696"
# sigma_rel of gamma = 0 (a uniform mean over [0, t]): the widest profile with gamma >= 0.
MAX_SIGMA_REL = math.sqrt(1 / 12)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2's exponent for a relative width: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) (Algorithm 2)."""
    if not 0 < sigma_rel <= MAX_SIGMA_REL:  # NaN fails this test too
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}] (the width of a mean over the whole run), "
                         f"not {sigma_rel}")
    t = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return max(0.0, float(roots.real[np.abs(roots.imag) < 1e-9].max()))


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the profile tau^gamma on [0, 1]."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


class PowerEMA(RunningAverage):
    """EDM2's power-function EMA of relative width ``sigma_rel`` (or exponent ``gamma``), in float32."""

    def __init__(self, sigma_rel: float | None = None, *, gamma: float | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(device)
        if (sigma_rel is None) == (gamma is None):
            raise ValueError("give exactly one of sigma_rel and gamma")
        if sigma_rel is not None:
            self.gamma = sigma_rel_to_gamma(sigma_rel)
        else:
            assert gamma is not None
            if not gamma >= 0 or math.isinf(gamma):
                raise ValueError(f"gamma must be a finite number >= 0, not {gamma}")
            self.gamma = gamma
        self.sigma_rel = sigma_rel

    @property
    def label(self) -> str:
        if self.sigma_rel is not None:
            return f"power_ema_sr{self.sigma_rel:g}"
        return f"power_ema_g{self.gamma:g}"

    def factor(self, step: int) -> float:
        """beta for a snapshot at ``step`` after the previous one: (t_prev / t)^(gamma + 1)."""
        assert self.last_step is not None
        return (self.last_step / step) ** (self.gamma + 1)

    def update(self, snapshot: Snapshot, step: int) -> bool:
        if step < 0:
            raise ValueError(f"a power-function EMA counts steps from 0; step {step} is before it")
        return super().update(snapshot, step)

    def _begin_fold(self, step: int) -> float:
        return 1 - self.factor(step)

    def _fold(self, names: list[str], state: list[torch.Tensor], new: list[torch.Tensor], weight: float) -> None:
        torch._foreach_lerp_(state, new, weight)
