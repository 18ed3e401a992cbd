"""SFA (sequential fine-tuning with averaging): pull the model back toward an anchor.

:func:`sfa_pull` is the one implementation of the pull, for the offline command
(:func:`sfa_merge`, :class:`AnchorPull`) and the training hook's merge-back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mergekit_like.averaging.base import RunningAverage, Snapshot, StateDict, pack_groups


def check_beta(beta: float) -> None:
    """Refuses a pull strength outside [0, 1] (NaN included)."""
    if not 0 <= beta <= 1 or math.isnan(beta):
        raise ValueError(f"beta must be in [0, 1], got {beta}")


def sfa_pull(theta: torch.Tensor, theta_o: torch.Tensor, beta: float, *,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """(1 - beta) theta + beta theta_o, as ``lerp(theta, theta_o, beta)`` in ``theta``'s dtype and device.

    ``theta_o`` is the model at the start of the task (Kleiman et al., "Soup to go",
    2025). Callers that average in float32 pass float32 tensors. ``out`` (``theta``'s
    shape, dtype and device; ``theta`` itself for a pull in place) receives the same
    bits the out-of-place pull returns, without a temporary.

    A kernel called per tensor or per chunk: it trusts ``beta``; whoever takes a beta
    from a user checks it once with :func:`check_beta` (:func:`sfa_merge`,
    :class:`AnchorPull`, the hook's ``SFA`` and its merge-back do).
    """
    end = theta_o.to(theta.device, theta.dtype)
    if out is None:
        return torch.lerp(theta, end, beta)
    return torch.lerp(theta, end, beta, out=out)


def sfa_merge(model: Snapshot, anchor: Snapshot, beta: float) -> dict[str, torch.Tensor]:
    """:func:`sfa_pull` in float32 for every floating tensor of ``model``; the others copied from it."""
    check_beta(beta)
    return {name: sfa_pull(tensor.float(), anchor[name], beta) if tensor.is_floating_point() else tensor.clone()
            for name, tensor in model.items()}


class AnchorPull(RunningAverage):
    """SFA as a state update: the first snapshot is the anchor theta_o, and each later one
    gives :func:`sfa_pull` (theta, theta_o, beta) in float32."""

    def __init__(self, beta: float = 0.5, *, device: torch.device | str | None = None) -> None:
        super().__init__(device)
        check_beta(beta)
        self.beta = beta
        self.anchor: dict[str, torch.Tensor] | None = None  # float32, by name
        self.anchor_step: int | None = None

    @property
    def label(self) -> str:
        return f"sfa_beta{self.beta:g}"

    def _begin_fold(self, step: int) -> float:
        if self.anchor is None:  # the state still is the first snapshot
            self.anchor = {name: t.clone() for name, t in self.state.items()}
            self.anchor_step = self.last_step
        return self.beta

    def _fold(self, names: list[str], state: list[torch.Tensor], new: list[torch.Tensor], weight: float) -> None:
        assert self.anchor is not None  # taken by _begin_fold
        for name, held, model in zip(names, state, new, strict=True):
            sfa_pull(model, self.anchor[name], weight, out=held)

    def state_dict(self) -> StateDict:
        if self.anchor is None:  # one snapshot so far: it is the anchor and the state
            return super().state_dict()
        groups = [(self.anchor_step, self.anchor), (self.last_step, {**self.state, **self.copied})]
        return {"last_step": self.last_step, "count": self.count, **pack_groups(groups)}

    def _load_groups(self, groups: Sequence[tuple[int, dict[str, torch.Tensor]]], count: int,
                     last_step: int | None) -> None:
        if len(groups) < 2:
            super()._load_groups(groups, count, last_step)
            self.anchor, self.anchor_step = None, None
            return
        if len(groups) > 2:
            raise ValueError(f"an SFA state holds its anchor and its state, not {len(groups)} groups of tensors")
        (anchor_step, anchor), (_, tensors) = groups
        self._restore(tensors, count, last_step)
        if set(anchor) != set(self.state):
            raise ValueError("an SFA state's anchor must hold the same floating tensors as its state")
        self.anchor = {name: anchor[name] for name in self.state}
        self.anchor_step = anchor_step
