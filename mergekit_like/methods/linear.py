"""Weighted average of the models (a model soup)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import torch

from mergekit_like.errors import MergeError
from mergekit_like.methods.declaration import (
    AMPLIFICATION_WARN,
    NONNEGATIVE_WEIGHT,
    PerModel,
    factor_text,
    merge_method,
    weights_do_not_cancel,
)


def _weights(weights: Sequence[float]) -> torch.Tensor:
    # The dtype weighted_average sums the weights in for every compute dtype but float64, which a
    # check on parameters cannot see: a float64 merge is judged as a float32 one.
    return torch.tensor(list(weights), dtype=torch.float32)


def _listed(weights: Sequence[float]) -> str:
    return ", ".join(f"{w:g}" for w in weights)


def weights_hold_in_float32(params: Mapping[str, Any]) -> str | None:
    """The weights must keep a non-zero sum (normalize) or some non-zero weight in float32, where the kernel
    adds them: 1e-300 is no weight there, and 0.1 + 0.2 - 0.3 sums to exactly zero."""
    if problem := weights_do_not_cancel(params):
        return problem
    weights = list(params.get("weight", [1]))
    w = _weights(weights)
    if not any(weights) or bool(w.sum() != 0):
        return None
    if params.get("normalize"):
        if not w.any():
            return (f"the weights {_listed(weights)} underflow to zero in float32 (the dtype linear adds them in), "
                    "so normalize cannot divide by their sum (scale them all up: normalize keeps only their ratios)")
        return (f"the weights {_listed(weights)} sum to zero in float32 (the dtype linear adds them in), "
                "so normalize cannot divide by their sum (change the weights or set normalize: false)")
    if not w.any():
        return (f"the weights {_listed(weights)} underflow to zero in float32 (the dtype linear adds them in): "
                "the output would be all zeros (give weights float32 can hold)")
    return None


def weights_amplify(params: Mapping[str, Any]) -> str | None:
    """Normalised weights that nearly cancel scale the output by sum |w| / |sum w| (1 for an average)."""
    if not params.get("normalize"):
        return None  # the output's scale is the weights the recipe wrote
    weights = list(params.get("weight", [1]))
    w = _weights(weights)
    total = w.sum()
    if total == 0:
        return None  # refused by weights_hold_in_float32
    factor = float(w.abs().sum() / total.abs())
    if factor <= AMPLIFICATION_WARN:
        return None
    return (f"linear: weights {_listed(weights)} sum to {float(total):.3g} in float32 and normalize divides by "
            f"that sum: the output is scaled by up to {factor_text(factor)}")


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
            what = (f"the weights underflow to zero in {str(acc_dtype).removeprefix('torch.')}"
                    if any(weights) and not w.any() else "weights sum to zero")
            raise MergeError(f"{what}, so normalize cannot divide by them",
                             fix="change the weights or set normalize: false")
        acc = acc / total
    return acc.to(dtype)


@merge_method(
    "linear",
    checks=(weights_hold_in_float32,),
    warns=(weights_amplify,),
    elementwise=True,
    paper="https://arxiv.org/abs/2203.05482",
    description="Weighted average of the models (weighted model soup); no base model.",
)
def linear(
    tensors: list[torch.Tensor], *, weight: Annotated[PerModel[float], NONNEGATIVE_WEIGHT], normalize: bool = True
) -> torch.Tensor:
    return weighted_average(tensors, list(weight), normalize)
