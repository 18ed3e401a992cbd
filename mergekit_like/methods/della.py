"""DELLA: drop task-vector entries at random by magnitude rank, rescale, TIES sign election."""

from __future__ import annotations

from typing import Annotated

import torch

from mergekit_like.methods.block_della import BlockDella, DellaBlock
from mergekit_like.methods.declaration import (
    NONNEGATIVE_WEIGHT,
    PerModel,
    Range,
    Typical,
    each,
    merge_method,
    weights_do_not_cancel,
)
from mergekit_like.methods.task_vectors import della_probabilities_in_range, make_trims, merge_task_vectors

# A negative epsilon runs (mergekit accepts it) but turns MAGPRUNE around.
EPSILON_TYPICAL = Typical(low=0, why="drops the larger entries more often than the small ones (DELLA keeps them)")


@merge_method(
    "della",
    checks=(weights_do_not_cancel, della_probabilities_in_range),
    inputs_as_stored=True,
    paper="https://arxiv.org/abs/2406.11617",
    description="Drop task-vector entries at random, larger ones less often (seeded), rescale, TIES sign election.",
    tensor_pass=BlockDella(),
    ignored_params=("int8_mask",),  # it only picks the dtype of the sign mask (see COMPATIBILITY_PARAMS)
)
def della(
    tensors: list[torch.Tensor],
    *,
    base: torch.Tensor,
    generator: torch.Generator,
    weight: Annotated[PerModel[float], NONNEGATIVE_WEIGHT],
    density: Annotated[PerModel[float], Range(0, 1)] = each(1.0),
    epsilon: Annotated[PerModel[float], EPSILON_TYPICAL] = each(0.15),
    normalize: bool = True,
    rescale: bool = True,
    lambda_: float = 1.0,
    block_della: DellaBlock | None = None,
) -> torch.Tensor:
    if block_della is not None:
        trims = block_della.trims(tensors, base)  # a row block: masks and sums from the tensor's passes
    else:
        trims = make_trims(tensors, base, density, "della", epsilons=epsilon, rescale=rescale, generator=generator)
    return merge_task_vectors(base, tensors, weight, trims, consensus="sum", normalize=normalize, scale=lambda_)
