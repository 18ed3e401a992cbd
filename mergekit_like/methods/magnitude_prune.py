"""Magnitude prune: keep each task vector's largest entries, then add them (TIES without the election).

PEFT's ``add_weighted_adapter(combination_type="magnitude_prune")``: the trim of TIES, a
weighted sum of what survives, no sign election and no division by the weights. It is
what a merge of adapters wants when their deltas touch different entries and should
simply add, and the one member of PEFT's family mergekit lacks.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Annotated

import torch

from mergekit_like.methods.block_sorted import SortedBlock
from mergekit_like.methods.block_topk import BlockTopK, BlockTrims
from mergekit_like.methods.declaration import (
    NONNEGATIVE_WEIGHT,
    PerModel,
    Range,
    each,
    merge_method,
    weights_do_not_cancel,
)
from mergekit_like.methods.task_vectors import TrimTies, make_trims, merge_task_vectors


@merge_method(
    "magnitude_prune",
    checks=(weights_do_not_cancel,),
    inputs_as_stored=True,
    paper="https://arxiv.org/abs/2306.01708",
    description="Trim task vectors to their largest entries (as TIES), then a weighted sum without election.",
    tensor_pass=BlockTopK(),
)
def magnitude_prune(
    tensors: list[torch.Tensor],
    *,
    base: torch.Tensor,
    weight: Annotated[PerModel[float], NONNEGATIVE_WEIGHT],
    density: Annotated[PerModel[float], Range(0, 1)] = each(1.0),
    rescale: bool = False,
    normalize: bool = False,
    lambda_: float = 1.0,
    trim_ties: TrimTies = "sort",
    executor: Executor | None = None,
    block_trims: BlockTrims | SortedBlock | None = None,
) -> torch.Tensor:
    if block_trims is not None:  # a row block: the thresholds come from a pass over the tensor's blocks
        trims = block_trims.trims(tensors, base)
    else:
        trims = make_trims(tensors, base, density, "magnitude", rescale=rescale, trim_ties=trim_ties,
                           executor=executor)
    return merge_task_vectors(base, tensors, weight, trims, consensus=None, normalize=normalize, scale=lambda_)
