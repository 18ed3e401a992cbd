"""Arcee Fusion: keep the model's changes only where they matter most to its output distribution."""

from __future__ import annotations

import torch

from mergekit_like.methods.declaration import merge_method

# Tensors larger than this estimate their quantiles from this many entries drawn with
# replacement: the sort stays bounded (and index storage with it) whatever the tensor's size.
QUANTILE_SAMPLE = 1_000_000
QUARTILES = (0.25, 0.5, 0.75)
# Added to both softmaxes so the log ratio stays finite where a probability underflows.
PROB_EPS = 1e-8
IQR_FACTOR = 1.5


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|model - base| * KL(softmax(model) || softmax(base))``, the divergence per last-dim row."""
    p = torch.softmax(model, dim=-1).add_(PROB_EPS)
    q = torch.softmax(base, dim=-1).add_(PROB_EPS)
    log_ratio = torch.div(p, q, out=q).log_()
    kl = log_ratio.mul_(p).sum(dim=-1, keepdim=True)
    del p, q, log_ratio
    return torch.sub(model, base).abs_().mul_(kl)


def approximate_quartiles(
    scores: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q1, the median and Q3 as entries of the sorted scores (or of a sample of them).

    The index of quantile q among n sorted entries is ``int(q * (n - 1))``, computed in
    float32 as mergekit does (above 2**24 entries float32 rounds it). Tensors with more than
    :data:`QUANTILE_SAMPLE` entries draw that many indices with ``generator``; mergekit
    draws them from torch's global generator, so there its thresholds, unlike ours, depend
    on whatever consumed random numbers before (seeding both alike gives the same draw).
    """
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator, device=flat.device)]
    ordered = torch.sort(flat).values
    q = torch.tensor(QUARTILES, dtype=torch.float32)
    q1, median, q3 = ordered[(q.to(ordered.device) * (ordered.numel() - 1)).long()]
    return q1, median, q3


def fusion_mask(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Where a score reaches the outlier threshold ``median + 1.5 * IQR``."""
    q1, median, q3 = approximate_quartiles(scores, generator)
    return scores >= median + IQR_FACTOR * (q3 - q1)


@merge_method(
    "arcee_fusion",
    paper="https://arcee.ai",
    description="The base, plus the model's change where |change| * KL(softmax(model) || softmax(base)) "
                "per row is an outlier (at least median + 1.5 IQR).",
    min_models=1,
    max_models=1,
    result_dtype=torch.float32,
)
def arcee_fusion(
    tensors: list[torch.Tensor], *, base: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    (other,) = tensors
    keep = fusion_mask(importance(other, base), generator)
    delta = torch.sub(other, base).mul_(keep)
    # mergekit multiplies by a float32 0/1 mask, which promotes a bf16 result to float32:
    # the kept change, widened exactly, is added to the base in float32 as it is there.
    return base + delta.to(torch.promote_types(delta.dtype, torch.float32))
