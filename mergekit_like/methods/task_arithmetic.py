"""Task arithmetic: add weighted task vectors to the base."""

from __future__ import annotations

import torch

from mergekit_like.methods.declaration import PerModel, merge_method, weights_do_not_cancel
from mergekit_like.methods.task_vectors import merge_task_vectors


@merge_method(
    "task_arithmetic",
    checks=(weights_do_not_cancel,),
    inputs_as_stored=True,
    elementwise=True,
    paper="https://arxiv.org/abs/2212.04089",
    description="base + lambda * sum w_i (x_i - base), optionally divided by sum w_i.",
    # mergekit declares these for its whole task-arithmetic family; task_arithmetic
    # neither sparsifies nor elects signs, so there they change nothing.
    ignored_params=("int8_mask", "rescale", "density"),
)
def task_arithmetic(
    tensors: list[torch.Tensor],
    *,
    base: torch.Tensor,
    weight: PerModel[float],
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    return merge_task_vectors(base, tensors, weight, consensus=None, normalize=normalize, scale=lambda_)
