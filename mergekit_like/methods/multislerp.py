"""Multi-SLERP: a weighted barycentre of any number of models on the hypersphere."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mergekit_like.errors import MergeError
from mergekit_like.methods.declaration import BaseUse, PerModel, merge_method


def normalized_weights_do_not_cancel(params: Mapping[str, Any]) -> str | None:
    """Normalised weights must not divide by a zero weight sum."""
    if params.get("normalize_weights") and sum(params.get("weight", [1])) == 0:
        return ("the weights sum to zero and normalize_weights is on "
                "(set normalize_weights: false or change the weights)")
    return None


def _stacked_directions(tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    """The models (minus the base), one flat row each, in one new buffer."""
    rows = torch.empty((len(tensors), tensors[0].numel()), dtype=tensors[0].dtype, device=tensors[0].device)
    for row, x in zip(rows, tensors):
        if base is None:
            row.copy_(x.reshape(-1))
        else:
            torch.sub(x.reshape(-1), base.reshape(-1), out=row)
    return rows


@merge_method(
    "multislerp",
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    description="Weighted mean on the hypersphere (via the tangent space at the Euclidean mean), "
                "rescaled to the weighted mean norm; with a base, of the task vectors.",
    base=BaseUse.OPTIONAL,
    checks=(normalized_weights_do_not_cancel,),
)
def multislerp(
    tensors: list[torch.Tensor],
    *,
    base: torch.Tensor | None = None,
    weight: PerModel[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]  # nothing to interpolate (mergekit returns the model, even with a base)
    vectors = _stacked_directions(tensors, base)
    # mergekit keeps the weights in the compute dtype (bf16 rounds them) and normalises them there.
    w = torch.tensor(list(weight), dtype=vectors.dtype, device=vectors.device)
    if normalize_weights:
        total = w.sum()
        if total == 0:
            raise MergeError("the weights sum to zero, so normalize_weights cannot divide by them",
                             fix="change the weights or set normalize_weights: false")
        w = w / total
    w_col = w.view(-1, 1)
    norms = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
    # From here on ``vectors`` holds unit directions and ``scratch`` every n-by-N product,
    # so the working memory is two stacks of the inputs, not mergekit's six.
    units = vectors.div_(norms + eps)
    scratch = torch.mul(units, w_col)
    mean = scratch.sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        return _cancelled(tensors, base, w)
    mean = mean / mean_norm
    dots = torch.mul(units, mean, out=scratch).sum(-1, keepdim=True)
    tangents = units.sub_(torch.mul(dots, mean, out=scratch))
    tangent = torch.mul(tangents, w_col, out=scratch).sum(0)
    del units, tangents, scratch, vectors
    # The exponential map at the mean takes the tangent back onto the sphere.
    tangent_norm = torch.linalg.vector_norm(tangent) + eps
    out = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    out = out * (norms.squeeze(-1) * w).sum()
    out = out.view(tensors[0].shape)
    if base is not None:
        out = out + base
    return out


def _cancelled(tensors: list[torch.Tensor], base: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    """Two directions whose weighted mean vanishes (opposite, equal weights): their linear mix, as
    mergekit; more have no direction to slerp around."""
    if len(tensors) != 2:
        raise MergeError(
            f"the weighted mean of the {len(tensors)} models' directions is zero (opposite task vectors "
            "whose weights balance, or models equal to the base), so it has no direction to slerp around",
            fix="change the weights, or leave out the models that cancel or equal the base",
        )
    x0, x1 = (x if base is None else x - base for x in tensors)
    out = x0 * w[0] + x1 * w[1]
    return out if base is None else out + base
