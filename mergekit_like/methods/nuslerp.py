"""NuSLERP: spherical interpolation of two models (or of their task vectors), t from their weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mergekit_like.methods.declaration import BaseUse, PerModel, merge_method
from mergekit_like.methods.row_wise import IndependentRows

# Norms below this count as this (a zero vector stays zero instead of dividing by zero).
NORM_FLOOR = 1e-7
# Directions whose sin^2 is at most COLINEAR_EPS**2 are interpolated linearly: slerp divides by sin.
COLINEAR_EPS = 1e-8
# Weights summing to less than this in magnitude say nothing about t: the midpoint.
ZERO_WEIGHT_SUM = 1e-6


def interpolation_t(weights: list[float]) -> float:
    """The second model's share ``w1 / (w0 + w1)``, or 0.5 when the weights cancel."""
    total = sum(weights)
    return 0.5 if abs(total) < ZERO_WEIGHT_SUM else weights[1] / total


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)


def _lerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    out = v0 * (1 - t)
    out += v1 * t
    return out


def slerp_rows(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Slerp from ``v0`` to ``v1`` along the last dimension, row by row, in the inputs' dtype.

    Rows at (nearly) the same or opposite direction take the linear interpolation. The
    operations and their operand order are mergekit's (a 0-dim tensor or a Python number
    as the second operand of a bf16 op keeps its float32 value; as the first it is rounded
    to bf16), so bf16 gives its numbers too.
    """
    product = _unit(v0)
    product *= _unit(v1)
    cos_theta = product.sum(dim=-1, keepdim=True).clamp(-1, 1)
    del product
    colinear = (1 - cos_theta.square()) <= COLINEAR_EPS**2
    if bool(colinear.all()):
        return _lerp(t, v0, v1)
    # acos(0) on colinear rows keeps their unused spherical branch finite.
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    out = v0 * torch.sin((1 - t) * theta)
    out += v1 * torch.sin(t * theta)
    out /= sin_theta
    if bool(colinear.any()):
        out = torch.where(colinear, _lerp(t, v0, v1), out)
    return out


def _rows_on_their_own(params: Mapping[str, Any]) -> bool:
    """Without flattening or columns, the vectors are the rows along the last dimension."""
    return not params.get("nuslerp_flatten", True) and not params.get("nuslerp_row_wise", False)


@merge_method(
    "nuslerp",
    tensor_pass=IndependentRows("block_rows", _rows_on_their_own),
    paper="https://en.wikipedia.org/wiki/Slerp",
    description="Slerp between two models, t = w1 / (w0 + w1); with a base, between their task vectors.",
    base=BaseUse.OPTIONAL,
    min_models=2,
    max_models=2,
)
def nuslerp(
    tensors: list[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weight: PerModel[float],
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
    block_rows: None = None,  # a row block of vectors along the last dimension is merged as it is
) -> torch.Tensor:
    x0, x1 = tensors
    t = interpolation_t(list(weight))
    if base is not None:
        x0, x1 = x0 - base, x1 - base
    if nuslerp_flatten:
        v0, v1 = x0.reshape(-1), x1.reshape(-1)
    elif nuslerp_row_wise:
        # Vectors along dim 0 (columns of a matrix), reduced through the transposed view as
        # mergekit does: a contiguous copy would sum in another order.
        v0, v1 = x0.transpose(0, -1), x1.transpose(0, -1)
    else:
        v0, v1 = x0, x1
    out = slerp_rows(t, v0, v1)
    if nuslerp_row_wise and not nuslerp_flatten:
        out = out.transpose(0, -1)
    out = out.reshape(x0.shape)
    if base is not None:
        out = base + out
    return out
