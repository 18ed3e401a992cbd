"""Passthrough: one model's tensor, unchanged or scaled (to stack or trim layers of a single model)."""

from __future__ import annotations

import torch

from mergekit_like.methods.declaration import PerModel, each, merge_method


@merge_method(
    "passthrough",
    paper="https://github.com/arcee-ai/mergekit#passthrough",
    description="The one model's tensor as it is, or times scale; no base model.",
    max_models=1,
    elementwise=True,
)
def passthrough(tensors: list[torch.Tensor], *, scale: PerModel[float | None] = each(None)) -> torch.Tensor:
    (tensor,) = tensors
    (factor,) = scale
    # None multiplies by nothing: the tensor as read, every bit (a NaN payload too), and no copy.
    return tensor if factor is None else tensor * factor
