"""Model Stock: move from the base towards the fine-tunes' mean by their geometry."""

from __future__ import annotations

from typing import Any

import torch

from mergekit_like.methods.declaration import Amplification, merge_method

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


def _rows(
    base: torch.Tensor, tensors: list[torch.Tensor], filter_wise: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The base and models as the ratio sees them: one row per filter (a vector is one row), or one flat vector."""
    if filter_wise:
        return _as_rows(base), [_as_rows(x) for x in tensors]
    return base.reshape(-1), [x.reshape(-1) for x in tensors]


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 1 else x


def stock_amplification(
    result: torch.Tensor, tensors: list[torch.Tensor], *, base: torch.Tensor, filter_wise: bool = False, **_: Any
) -> float:
    """How many times farther than its farthest fine-tune the merge moved from the base (the worst
    row for ``filter_wise``): at most 1 while the task vectors' mean cosine is positive, and
    without bound as ``1 + (n - 1) cos`` nears zero (nearly opposite task vectors)."""
    rows, models = _rows(base, tensors, filter_wise)
    moved = torch.norm(result.reshape(rows.shape) - rows, dim=-1)
    farthest = torch.stack([torch.norm(x - rows, dim=-1) for x in models]).amax(0)
    # A row no fine-tune moved stays the base's (t times a zero mean): nothing amplified there.
    ratio = torch.where(farthest > 0, moved / torch.where(farthest > 0, farthest, 1), 0)
    return float(ratio.max())


@merge_method(
    "model_stock",
    paper="https://arxiv.org/abs/2403.19522",
    description="t * mean(fine-tunes) + (1 - t) * base, t from the task vectors' mean cosine.",
    min_models=2,
    # mergekit computes the same unbounded t, so this is a warning, not a refusal.
    amplification=Amplification(
        stock_amplification,
        says="{method}: tensor '{tensor}' moves {factor} times as far from the base as its farthest fine-tune "
             "(its task vectors point nearly opposite ways, so t = n cos / (1 + (n - 1) cos) is huge); "
             "mergekit computes the same",
    ),
)
def model_stock(tensors: list[torch.Tensor], *, base: torch.Tensor, filter_wise: bool = False) -> torch.Tensor:
    shape = base.shape
    rows, models = _rows(base, tensors, filter_wise)
    t = stock_ratio([x - rows for x in models])
    mean = sum(models) / len(models)
    return (t * mean + (1 - t) * rows).reshape(shape)
