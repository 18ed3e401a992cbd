"""TIES: trim each task vector, elect a sign per entry, average the agreeing entries."""

from __future__ import annotations

from typing import Literal

import torch

from mergekit_like.methods.registry import PerModel, merge_method
from mergekit_like.methods.task_vectors import (
    Consensus,
    TrimTies,
    make_trims,
    merge_task_vectors,
    threshold_trim,
)


@merge_method(
    "ties",
    inputs_as_stored=True,
    paper="https://arxiv.org/abs/2306.01708",
    description="Trim task vectors to their largest entries, elect signs, disjoint mean.",
    ignored_params=("int8_mask",),
)
def ties(
    tensors: list[torch.Tensor],
    *,
    base: torch.Tensor,
    weight: PerModel[float],
    density: PerModel[float] = 1.0,
    normalize: bool = True,
    rescale: bool = False,
    lambda_: float = 1.0,
    consensus: Consensus = "sum",
    trim_scope: Literal["tensor", "model"] = "tensor",
    trim_ties: TrimTies = "sort",
    thresholds: list[float] | None = None,
) -> torch.Tensor:
    if trim_scope == "model":
        # Keep |d| at or above the model-wide k-th largest magnitude, as the original TIES code.
        if thresholds is None:
            raise ValueError("trim_scope 'model' needs the model-wide thresholds")
        trims = [threshold_trim(x, base, t, rescale) for x, t in zip(tensors, thresholds)]
    else:
        trims = make_trims(tensors, base, density, "magnitude", rescale=rescale, trim_ties=trim_ties)
    return merge_task_vectors(base, tensors, weight, trims, consensus=consensus, normalize=normalize, scale=lambda_)
