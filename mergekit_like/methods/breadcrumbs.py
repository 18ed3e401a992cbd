"""Model breadcrumbs: drop each task vector's outliers and its smallest entries, then add."""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Annotated

import torch

from mergekit_like.methods.block_sorted import BlockSortedTrims, SortedBlock
from mergekit_like.methods.declaration import (
    NONNEGATIVE_WEIGHT,
    PerModel,
    Range,
    each,
    merge_method,
    weights_do_not_cancel,
)
from mergekit_like.methods.task_vectors import make_trims, merge_task_vectors


@merge_method(
    "breadcrumbs",
    checks=(weights_do_not_cancel,),
    inputs_as_stored=True,
    paper="https://arxiv.org/abs/2312.06795",
    description="Drop the largest gamma and smallest entries of each task vector; task arithmetic.",
    ignored_params=("int8_mask",),  # mergekit accepts it; without sign election it is unused
    tensor_pass=BlockSortedTrims("breadcrumbs"),
)
def breadcrumbs(
    tensors: list[torch.Tensor],
    *,
    base: torch.Tensor,
    weight: Annotated[PerModel[float], NONNEGATIVE_WEIGHT],
    density: Annotated[PerModel[float], Range(0, 1)] = each(1.0),
    gamma: Annotated[PerModel[float], Range(0, 1)] = each(0.01),
    rescale: bool = False,
    normalize: bool = False,
    lambda_: float = 1.0,
    executor: Executor | None = None,
    block_trims: SortedBlock | None = None,
) -> torch.Tensor:
    if block_trims is not None:  # a row block: its masks come from a pass over the tensor's blocks
        trims = block_trims.trims(tensors, base)
    else:
        trims = make_trims(tensors, base, density, "breadcrumbs", gammas=gamma, rescale=rescale, executor=executor)
    return merge_task_vectors(base, tensors, weight, trims, consensus=None, normalize=normalize, scale=lambda_)
