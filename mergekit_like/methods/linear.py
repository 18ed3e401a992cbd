"""Weighted average of the models (a model soup)."""

from __future__ import annotations

from typing import Annotated

import torch

from mergekit_like.errors import MergeError
from mergekit_like.methods.declaration import NONNEGATIVE_WEIGHT, PerModel, merge_method, weights_do_not_cancel


def weighted_average(tensors: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """``sum w_i x_i (/ sum w_i)``, accumulated in float32 (float64 for float64 inputs).

    Accumulates with a fused multiply-add in model order and divides last, as
    mergekit does, so its recipes give its numbers to the last bit.
    """
    dtype = tensors[0].dtype
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.tensor(weights, dtype=acc_dtype, device=tensors[0].device)
    acc = torch.zeros_like(tensors[0], dtype=acc_dtype)
    for x, wi in zip(tensors, w):
        acc.addcmul_(x.to(acc_dtype), wi)
    if normalize:
        total = w.sum()
        if total == 0:
            raise MergeError("weights sum to zero, so normalize cannot divide by them",
                             fix="change the weights or set normalize: false")
        acc = acc / total
    return acc.to(dtype)


@merge_method(
    "linear",
    checks=(weights_do_not_cancel,),
    elementwise=True,
    paper="https://arxiv.org/abs/2203.05482",
    description="Weighted average of the models (weighted model soup); no base model.",
)
def linear(
    tensors: list[torch.Tensor], *, weight: Annotated[PerModel[float], NONNEGATIVE_WEIGHT], normalize: bool = True
) -> torch.Tensor:
    return weighted_average(tensors, list(weight), normalize)
