"""SFA (sequential fine-tuning with averaging): pull the model back toward an anchor."""

from __future__ import annotations

import torch

from mergekit_like.averaging.base import Averager, Snapshot


def sfa_merge(model: Snapshot, anchor: Snapshot, beta: float) -> dict[str, torch.Tensor]:
    """(1 - beta) theta + beta theta_o in float32 for floating tensors; others from ``model``.

    ``theta_o`` (``anchor``) is the model at the start of the task (Kleiman et
    al., "Soup to go", 2025).
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    merged = {}
    for name, tensor in model.items():
        if tensor.is_floating_point():
            merged[name] = torch.lerp(tensor.float(), anchor[name].to(tensor.device, torch.float32), beta)
        else:
            merged[name] = tensor.clone()
    return merged


class AnchorPull(Averager):
    """Offline SFA as a state update: the first snapshot is the anchor theta_o, and each
    later one gives (1 - beta) theta + beta theta_o."""

    def __init__(self, beta: float = 0.5, *, device: torch.device | str | None = None) -> None:
        super().__init__(device)
        if not 0 <= beta <= 1:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta = beta
        self.anchor: list[torch.Tensor] | None = None

    @property
    def label(self) -> str:
        return f"sfa_beta{self.beta:g}"

    def _fold(self, state: list[torch.Tensor], new: list[torch.Tensor], step: int) -> None:
        if self.anchor is None:
            self.anchor = [t.clone() for t in state]
        torch._foreach_copy_(state, new)
        torch._foreach_lerp_(state, self.anchor, self.beta)
