"""Model breadcrumbs with TIES' sign election and disjoint mean."""

from __future__ import annotations

import torch

from mergekit_like.methods.registry import PerModel, merge_method
from mergekit_like.methods.task_vectors import Consensus, make_trims, merge_task_vectors


@merge_method(
    "breadcrumbs_ties",
    inputs_as_stored=True,
    paper="https://arxiv.org/abs/2312.06795",
    description="Breadcrumbs sparsification, then TIES sign election and disjoint mean.",
    ignored_params=("int8_mask",),
)
def breadcrumbs_ties(
    tensors: list[torch.Tensor],
    *,
    base: torch.Tensor,
    weight: PerModel[float],
    density: PerModel[float] = 1.0,
    gamma: PerModel[float] = 0.01,
    rescale: bool = False,
    normalize: bool = False,
    lambda_: float = 1.0,
    consensus: Consensus = "sum",
) -> torch.Tensor:
    trims = make_trims(tensors, base, density, "breadcrumbs", gammas=gamma, rescale=rescale)
    return merge_task_vectors(base, tensors, weight, trims, consensus=consensus, normalize=normalize, scale=lambda_)
