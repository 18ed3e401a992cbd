"""Uniform model soup: the plain mean of the models."""

from __future__ import annotations

import torch

from mergekit_like.methods.declaration import merge_method
from mergekit_like.methods.linear import weighted_average


@merge_method(
    "uniform_soup",
    elementwise=True,
    paper="https://arxiv.org/abs/2203.05482",
    description="Uniform model soup: the mean of the models (linear with equal weights).",
)
def uniform_soup(tensors: list[torch.Tensor]) -> torch.Tensor:
    return weighted_average(tensors, [1.0] * len(tensors), normalize=True)
