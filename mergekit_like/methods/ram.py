"""RAM: add each task vector's unique entries whole and average the entries several models share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from mergekit_like.methods.declaration import Range, merge_method


@dataclass(frozen=True)
class Contributions:
    """Which models change which entries (by more than epsilon), over the flattened tensors."""

    kept: torch.Tensor  # (models, entries): the task vectors, zero where a model does not contribute
    present: torch.Tensor  # (models, entries) bool: the model contributes to the entry
    counts: torch.Tensor  # (1, entries): how many models contribute
    shared: torch.Tensor  # (1, entries) bool: more than one does
    unique: torch.Tensor  # (1, entries) bool: exactly one does


def contributions(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float) -> Contributions:
    """The task vectors and their overlap, as the RAM paper counts it."""
    task_vectors = torch.stack([x - base for x in tensors]).reshape(len(tensors), -1)
    present = task_vectors.abs() > epsilon
    counts = present.sum(dim=0, keepdim=True)
    return Contributions(task_vectors * present, present, counts, counts > 1, counts == 1)


def shared_part(c: Contributions) -> torch.Tensor:
    """Each model's share of the entries it shares: its value over the number of contributors."""
    return c.kept * c.shared / c.counts.clamp(min=1)


@merge_method(
    "ram",
    elementwise=True,
    inputs_as_stored=True,
    paper="https://arxiv.org/abs/2601.13572",
    description="Unique task-vector entries added whole, entries several models change averaged among them.",
)
def ram(
    tensors: list[torch.Tensor],
    *,
    base: torch.Tensor,
    epsilon: Annotated[float, Range(0, None)] = 1e-5,
) -> torch.Tensor:
    c = contributions(tensors, base, epsilon)
    # Both parts for every model, then summed over models, as mergekit: for finite values
    # the same as kept / counts, but an infinite entry turns NaN (inf * 0) as it does there.
    merged = (c.kept * c.unique + shared_part(c)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)
