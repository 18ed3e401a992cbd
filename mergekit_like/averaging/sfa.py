"""SFA (sequential fine-tuning with averaging): pull the model back toward an anchor."""

from __future__ import annotations

import torch

from mergekit_like.averaging.base import Snapshot


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
