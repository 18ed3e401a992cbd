"""Model Stock: move from the base towards the fine-tunes' mean by their geometry."""

from __future__ import annotations

import torch

from mergekit_like.methods.declaration import merge_method

NORM_PRODUCT_EPS = 1e-6
SINGULAR = 1e-6


def stock_ratio(deltas: list[torch.Tensor]) -> torch.Tensor:
    """t = n cos / (1 + (n - 1) cos), cos the mean pairwise cosine of the task vectors.

    ``deltas`` are flat (one ratio) or 2-D (one ratio per row). Where the
    denominator vanishes t is 0, which keeps the base (as mergekit).
    """
    cosines = []
    for i, a in enumerate(deltas):
        for b in deltas[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(-1) / norms.clamp(min=NORM_PRODUCT_EPS)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    n = len(deltas)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), n * cos / safe)


@merge_method(
    "model_stock",
    paper="https://arxiv.org/abs/2403.19522",
    description="t * mean(fine-tunes) + (1 - t) * base, t from the task vectors' mean cosine.",
    min_models=2,
)
def model_stock(tensors: list[torch.Tensor], *, base: torch.Tensor, filter_wise: bool = False) -> torch.Tensor:
    shape = base.shape
    if filter_wise:
        rows = base.unsqueeze(0) if base.dim() == 1 else base
        models = [x.unsqueeze(0) if x.dim() == 1 else x for x in tensors]
    else:
        rows = base.reshape(-1)
        models = [x.reshape(-1) for x in tensors]
    t = stock_ratio([x - rows for x in models])
    mean = sum(models) / len(models)
    return (t * mean + (1 - t) * rows).reshape(shape)
