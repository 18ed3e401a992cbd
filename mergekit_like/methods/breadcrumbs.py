"""Model breadcrumbs: drop each task vector's outliers and its smallest entries, then add."""

from __future__ import annotations

import torch

from mergekit_like.methods.registry import PerModel, merge_method
from mergekit_like.methods.task_vectors import combine_task_vectors, sparse_task_vectors


@merge_method(
    "breadcrumbs",
    paper="https://arxiv.org/abs/2312.06795",
    description="Drop the largest gamma and smallest entries of each task vector; task arithmetic.",
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
    deltas = sparse_task_vectors(tensors, base, density, "breadcrumbs", gammas=gamma, rescale=rescale)
    return combine_task_vectors(base, deltas, weight, consensus=None, normalize=normalize, scale=lambda_)
