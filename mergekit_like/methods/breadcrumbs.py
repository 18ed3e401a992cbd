"""Model breadcrumbs: drop each task vector's outliers and its smallest entries, then add."""

from __future__ import annotations

import torch

from mergekit_like.methods.registry import PerModel, merge_method
from mergekit_like.methods.task_vectors import make_trims, merge_task_vectors


@merge_method(
    "breadcrumbs",
    inputs_as_stored=True,
    paper="https://arxiv.org/abs/2312.06795",
    description="Drop the largest gamma and smallest entries of each task vector; task arithmetic.",
    ignored_params=("int8_mask",),  # mergekit accepts it; without sign election it is unused
)
def breadcrumbs(
    tensors: list[torch.Tensor],
    *,
    base: torch.Tensor,
    weight: PerModel[float],
    density: PerModel[float] = 1.0,
    gamma: PerModel[float] = 0.01,
    rescale: bool = False,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    trims = make_trims(tensors, base, density, "breadcrumbs", gammas=gamma, rescale=rescale)
    return merge_task_vectors(base, tensors, weight, trims, consensus=None, normalize=normalize, scale=lambda_)
