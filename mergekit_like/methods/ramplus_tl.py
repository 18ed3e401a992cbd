"""RAM+ (tensor-local): RAM, with each model's unique entries reinforced by how much it overlaps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch

from mergekit_like.methods.declaration import Range, Typical, merge_method
from mergekit_like.methods.ram import contributions, shared_part


def epsilon_divides(params: Mapping[str, Any]) -> str | None:
    """epsilon floors a divisor (each model's unique count), so in float32 it must stay above 0."""
    epsilon = params.get("epsilon", 1.0)
    if torch.tensor(epsilon, dtype=torch.float32).item() <= 0:
        return (f"epsilon {epsilon:g} is zero in float32, and ramplus_tl divides by it when a model changes "
                "no entry on its own (use epsilon: 1e-5, the default)")
    return None


@merge_method(
    "ramplus_tl",
    checks=(epsilon_divides,),
    inputs_as_stored=True,
    paper="https://arxiv.org/abs/2601.13572",
    description="RAM, scaling each model's unique entries by 1 + r * min(its shared/unique count ratio, alpha) "
                "within each tensor.",
    result_dtype=torch.float32,  # the scale is a float32 ratio of counts, which promotes a 16-bit result
)
def ramplus_tl(
    tensors: list[torch.Tensor],
    *,
    base: torch.Tensor,
    r: Annotated[float, Typical(low=0, why="shrinks the unique entries instead of reinforcing them")] = 0.1,
    alpha: Annotated[float, Range(0, None)] = 0.2,
    epsilon: Annotated[float, Range(0, None)] = 1e-5,
) -> torch.Tensor:
    """In float32 for 16-bit inputs: the reinforcement is a float32 tensor (as mergekit, whose output
    is that float32 sum)."""
    c = contributions(tensors, base, epsilon)
    shared_counts = (c.present & c.shared).sum(dim=1)
    unique_counts = (c.present & c.unique).sum(dim=1)
    # epsilon also floors the unique count: a model with no unique entry gets the full alpha
    # (or none, sharing nothing either: 0 / epsilon).
    ratio = shared_counts / unique_counts.clamp(min=epsilon)
    reinforce = 1 + r * ratio.clamp(min=0, max=alpha)
    merged = (c.kept * c.unique * reinforce.unsqueeze(-1) + shared_part(c)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)
