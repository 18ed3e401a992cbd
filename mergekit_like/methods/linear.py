"""Weighted average of the models (a model soup)."""

from __future__ import annotations

import torch

from mergekit_like.errors import MergeError
from mergekit_like.methods.registry import PerModel, merge_method


def weighted_average(
    tensors: list[torch.Tensor], weights: list[float], normalize: bool, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``sum w_i x_i (/ sum w_i)`` in ``dtype`` (default: the inputs'), accumulated in float32
    (float64 for float64).

    Accumulates with a fused multiply-add in model order and divides last, as
    mergekit does, so its recipes give its numbers to the last bit. Inputs of a
    narrower dtype (bf16 for a float32 merge) are widened inside the multiply-add.
    """
    dtype = dtype or tensors[0].dtype
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.tensor(weights, dtype=acc_dtype, device=tensors[0].device)
    acc = torch.zeros(tensors[0].shape, dtype=acc_dtype, device=tensors[0].device)
    for x, wi in zip(tensors, w):
        acc.addcmul_(x, wi)  # promotes to acc's dtype: the same bits as widening x first
    if normalize:
        total = w.sum()
        if total == 0:
            raise MergeError("weights sum to zero, so normalize cannot divide by them",
                             fix="change the weights or set normalize: false")
        acc = acc / total
    return acc.to(dtype)


@merge_method(
    "linear",
    elementwise=True,
    inputs_as_stored=True,
    paper="https://arxiv.org/abs/2203.05482",
    description="Weighted average of the models (weighted model soup); no base model.",
)
def linear(
    tensors: list[torch.Tensor], *, weight: PerModel[float], normalize: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    return weighted_average(tensors, list(weight), normalize, compute_dtype)
