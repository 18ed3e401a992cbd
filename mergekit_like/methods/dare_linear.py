"""DARE: randomly drop task-vector entries, rescale the rest, add them to the base."""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Annotated

import torch

from mergekit_like.methods.block_dare import BlockDrop, DropBlock
from mergekit_like.methods.declaration import (
    NONNEGATIVE_WEIGHT,
    PerModel,
    Range,
    each,
    merge_method,
    weights_do_not_cancel,
)
from mergekit_like.methods.task_vectors import RescaleMode, make_trims, merge_task_vectors


@merge_method(
    "dare_linear",
    checks=(weights_do_not_cancel,),
    inputs_as_stored=True,
    paper="https://arxiv.org/abs/2311.03099",
    description="Drop task-vector entries at random (seeded), rescale, task arithmetic.",
    tensor_pass=BlockDrop(),
    ignored_params=("int8_mask",),  # mergekit accepts it; without sign election it is unused
)
def dare_linear(
    tensors: list[torch.Tensor],
    *,
    base: torch.Tensor,
    generator: torch.Generator,
    executor: Executor | None = None,
    weight: Annotated[PerModel[float], NONNEGATIVE_WEIGHT],
    density: Annotated[PerModel[float], Range(0, 1)] = each(1.0),
    rescale: bool = True,
    rescale_mode: RescaleMode = "l1",
    normalize: bool = False,
    lambda_: float = 1.0,
    block_drops: DropBlock | None = None,
) -> torch.Tensor:
    if block_drops is not None:  # a row block of a large tensor: its part of the whole tensor's masks
        trims = block_drops.trims(tensors, base)
    else:
        trims = make_trims(tensors, base, density, "bernoulli", rescale=rescale, rescale_mode=rescale_mode,
                           generator=generator, executor=executor)
    return merge_task_vectors(base, tensors, weight, trims, consensus=None, normalize=normalize, scale=lambda_)
