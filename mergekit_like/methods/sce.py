"""SCE: select the entries where task vectors differ most, weight by energy, erase minority signs."""

from __future__ import annotations

from typing import Annotated

import torch

from mergekit_like.methods.declaration import Range, merge_method

# Below this the task vectors' total energy counts as zero and the weights are uniform (as mergekit).
ZERO_ENERGY = 1e-6
# The erased weights' sum is clamped here: an entry no model keeps adds nothing (as mergekit).
MIN_WEIGHT_SUM = 1e-6


@merge_method(
    "sce",
    inputs_as_stored=True,
    paper="https://arxiv.org/abs/2408.07990",
    description="Keep the top select_topk entries by variance across task vectors, weight each task vector by "
                "its mean square, erase minority signs.",
    ignored_params=("int8_mask",),  # it only picks the dtype of 0/1 masks: the same numbers either way
)
def sce(
    tensors: list[torch.Tensor],
    *,
    base: torch.Tensor,
    select_topk: Annotated[float, Range(0, 1)] = 1.0,
) -> torch.Tensor:
    # Stacked, as mergekit: its reductions over models and entries then run in the same order.
    task_vectors = torch.stack([x - base for x in tensors])
    if select_topk < 1:
        task_vectors = task_vectors * variance_top_k_mask(task_vectors, select_topk)
    agree = sign_agreement(task_vectors)
    weights = energy_weights(task_vectors).reshape(-1, *[1] * base.dim())
    erased = weights * agree
    merged = (task_vectors * erased).sum(dim=0)
    return base + merged / erased.sum(dim=0).clamp(min=MIN_WEIGHT_SUM)


def variance_top_k_mask(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 for the ``fraction`` of entries whose variance across models is largest, else 0.

    The fraction is of the entries with a nonzero variance, in the task vectors' dtype.
    """
    if fraction <= 0:
        return torch.zeros_like(task_vectors[0])
    if fraction >= 1:
        return torch.ones_like(task_vectors[0])
    variance = torch.var(task_vectors, dim=0, unbiased=False)
    # A float32 product, as mergekit's (count tensor times fraction): int() of it can differ
    # from the double product's near whole numbers.
    k = int(torch.count_nonzero(variance) * fraction)
    mask = torch.zeros_like(variance)
    if k == 0:
        return mask
    # torch.topk, as mergekit: it decides which of the entries tied at the threshold are kept.
    mask.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def sign_agreement(task_vectors: torch.Tensor) -> torch.Tensor:
    """Where each model's sign is the sign of the entry's sum over models (TIES' election; zero never agrees).

    On the stacked tensor, not model by model: the vote is one sum over models in torch's
    order, so an entry whose sum nearly cancels elects mergekit's sign.
    """
    votes = task_vectors.sum(dim=0)
    elected = (votes >= 0).to(task_vectors.dtype) * 2 - 1
    return task_vectors.sign() == elected


def energy_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """Each model's mean squared task vector, over their total (uniform when all are zero)."""
    energy = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    # As mergekit, the total as a Python number decides the uniform fallback.
    total = torch.sum(energy).item()
    if abs(total) < ZERO_ENERGY:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total
