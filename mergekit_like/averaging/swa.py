"""Stochastic weight averaging: the running uniform mean of snapshots in a step window."""

from __future__ import annotations

import torch

from mergekit_like.averaging.base import RunningAverage


class UniformMean(RunningAverage):
    """a <- a + (x - a) / (n + 1): the mean of every snapshot folded in (torch's SWA update)."""

    def _fold(self, names: list[str], state: list[torch.Tensor], new: list[torch.Tensor], weight: float) -> None:
        fold_mean(state, new, self.count)


def fold_mean(state: list[torch.Tensor], new: list[torch.Tensor], count: int) -> None:
    """``state`` (the mean of ``count`` snapshots) becomes the mean with ``new`` too, in place.

    The same operations, in the same order, as torch.optim.swa_utils' default SWA avg_fn.
    """
    difference = torch._foreach_sub(new, state)
    torch._foreach_div_(difference, count + 1)
    torch._foreach_add_(state, difference)


class SWA(UniformMean):
    """The uniform mean of the snapshots with ``start <= step <= end`` (open ends: None)."""

    def __init__(
        self, start: int | None = None, end: int | None = None, *, device: torch.device | str | None = None
    ) -> None:
        super().__init__(device)
        if start is not None and end is not None and end < start:
            raise ValueError(f"SWA window ends ({end}) before it starts ({start})")
        self.start = start
        self.end = end

    @property
    def label(self) -> str:
        return "swa" + (f"_from{self.start}" if self.start is not None else "") + (
            f"_to{self.end}" if self.end is not None else "")

    def accepts(self, step: int) -> bool:
        return (self.start is None or step >= self.start) and (self.end is None or step <= self.end)
