"""WiSE-FT: interpolate linearly between the zero-shot (base) and fine-tuned weights."""

from __future__ import annotations

from typing import Annotated

import torch

from mergekit_like.methods.declaration import Sweep, merge_method


@merge_method(
    "wise_ft",
    elementwise=True,
    paper="https://arxiv.org/abs/2109.01903",
    description="(1 - alpha) * base + alpha * fine-tuned; a list of alphas writes one output each.",
    min_models=1,
    max_models=1,
)
def wise_ft(tensors: list[torch.Tensor], *, base: torch.Tensor, alpha: Annotated[float, Sweep()] = 0.5) -> torch.Tensor:
    (finetuned,) = tensors
    return torch.lerp(base, finetuned, alpha) if base.is_floating_point() else base.clone()
