"""DARE-TIES: DARE's random drop, then TIES' sign election and disjoint mean."""

from __future__ import annotations

import torch

from mergekit_like.methods.registry import PerModel, merge_method
from mergekit_like.methods.task_vectors import Consensus, RescaleMode, make_trims, merge_task_vectors


@merge_method(
    "dare_ties",
    inputs_as_stored=True,
    paper="https://arxiv.org/abs/2311.03099",
    description="Drop task-vector entries at random (seeded), rescale, TIES sign election.",
    ignored_params=("int8_mask",),
)
def dare_ties(
    tensors: list[torch.Tensor],
    *,
    base: torch.Tensor,
    generator: torch.Generator,
    weight: PerModel[float],
    density: PerModel[float] = 1.0,
    rescale: bool = True,
    rescale_mode: RescaleMode = "l1",
    normalize: bool = False,
    lambda_: float = 1.0,
    consensus: Consensus = "sum",
) -> torch.Tensor:
    trims = make_trims(
        tensors, base, density, "bernoulli", rescale=rescale, rescale_mode=rescale_mode, generator=generator
    )
    return merge_task_vectors(base, tensors, weight, trims, consensus=consensus, normalize=normalize, scale=lambda_)
