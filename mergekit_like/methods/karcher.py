"""Karcher mean: the Riemannian centre of mass of the models' directions on the unit sphere."""

from __future__ import annotations

import torch

from mergekit_like.methods.declaration import merge_method


def _norm(x: torch.Tensor) -> torch.Tensor:
    """The 2-norm, as a 0-dim tensor in float32 (float64 for float64): bf16 sums of squares overflow."""
    return torch.linalg.vector_norm(x.to(torch.float64 if x.dtype == torch.float64 else torch.float32))


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """The ``alphas``-weighted Karcher mean direction, scaled by the weighted mean norm.

    Models whose norm is at most ``tol`` have no direction and are left out of the mean
    (but not of the scale). Each step moves the estimate along the mean of the log maps
    (the weighted tangent vectors towards each model); it stops after ``max_iter`` steps
    or once that mean is shorter than ``tol``. The operations and operand order are
    mergekit's: a 0-dim float32 tensor is rounded to bf16 as the first operand of a bf16
    op but not as the second, so bf16 gives its numbers only this way.
    """
    norms = [_norm(x) for x in tensors]
    # Scalars are read (.item()) only to choose branches and stop; the numbers stay tensors.
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    # A zero model is valid only for a negative tol; its direction is then zero, not 0/0.
    units = [torch.zeros_like(tensors[i]) if norms[i].item() == 0.0 else (tensors[i] / norms[i]).to(tensors[i].dtype)
             for i in valid]
    alpha_sum = sum(alphas[i] for i in valid)
    weights = [alphas[i] / alpha_sum for i in valid]

    mean = torch.zeros_like(units[0])
    for weight, unit in zip(weights, units):
        mean += weight * unit
    mean_norm = _norm(mean)
    # Directions that cancel give no starting point: start from the first model's.
    mean = units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for weight, unit in zip(weights, units):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue  # the log map towards a point already reached is zero
            # unit - dot * mean, times the log map's length factor, in one buffer: the factor has
            # the dtype of the step, so its place as an operand changes no bit.
            step = torch.mul(dot, mean)
            torch.sub(unit, step, out=step)
            tangent += step.mul_(weight * (theta / torch.sin(theta)))
            del step
        tangent_norm = _norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        # The exponential map leaves the sphere by rounding only; back onto it.
        length = _norm(mean)
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)

    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms))
    return scale * mean


@merge_method(
    "karcher",
    paper="https://arxiv.org/abs/2603.04972",
    description="Riemannian (Karcher) mean of the models' directions on the sphere, "
                "scaled by their mean norm; no base model.",
)
def karcher(
    tensors: list[torch.Tensor],
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    return karcher_mean(tensors, [1.0 / len(tensors)] * len(tensors), max_iter, tol)
