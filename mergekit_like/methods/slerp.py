"""Spherical linear interpolation between the base and one other model."""

from __future__ import annotations

from typing import Annotated

import torch

from mergekit_like.methods.declaration import Typical, merge_method

# Colinear vectors (|cos| above this) are interpolated linearly: slerp is ill-conditioned there.
DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8
# mergekit reduces tensors over 2**20 elements chunk by chunk; summing in the same
# chunks gives its numbers to the last bit on large tensors too.
CHUNK = 1024 * 1024
# mergekit does not clamp t (nor do we: its numbers are ours), but outside [0, 1] the result is no
# longer between the two models.
INTERPOLATES = Typical(0, 1, why="extrapolates beyond the two models when t is outside [0, 1] "
                                "(past the base below 0, past the other model above 1); mergekit computes the same")


def _chunks(x: torch.Tensor) -> list[torch.Tensor]:
    return list(x.split(CHUNK)) if x.numel() else [x]


def slerp_coefficients(v0: torch.Tensor, v1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of ``v0`` and ``v1`` (flat, in the working dtype) in the interpolation at ``t``."""
    norm0 = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(c) for c in _chunks(v0)]))
    norm1 = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(c) for c in _chunks(v1)]))
    norm0 = torch.where(norm0 > NORM_EPS, norm0, 1)
    norm1 = torch.where(norm1 > NORM_EPS, norm1, 1)
    dot = torch.stack([((a / norm0) * (b / norm1)).sum() for a, b in zip(_chunks(v0), _chunks(v1))])
    dot = dot.sum().clamp(-1, 1)
    if dot.abs() > DOT_THRESHOLD:
        return 1 - t, t
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - t) * theta) / sin_theta, torch.sin(t * theta) / sin_theta


@merge_method(
    "slerp",
    paper="https://en.wikipedia.org/wiki/Slerp",
    description="Spherical interpolation from the base (t=0) to the other model (t=1).",
    min_models=1,
    max_models=1,
)
def slerp(tensors: list[torch.Tensor], *, base: torch.Tensor, t: Annotated[float, INTERPOLATES]) -> torch.Tensor:
    (other,) = tensors
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    v0 = base.reshape(-1).to(dtype)
    v1 = other.reshape(-1).to(dtype)
    t_value = torch.tensor(t, dtype=dtype, device=base.device)
    if v0.numel() == 0:
        return base.clone()
    c0, c1 = slerp_coefficients(v0, v1, t_value)
    return (c0 * v0 + c1 * v1).to(base.dtype).reshape(base.shape)
