"""The one kernel behind task arithmetic, TIES, DARE and breadcrumbs.

Every member of the family computes task vectors ``d_i = x_i - base``,
optionally sparsifies each (magnitude top-k, random drop, or breadcrumbs'
outlier-and-small cut), weights them, optionally elects a sign per entry and
keeps only the agreeing entries (the TIES disjoint mean), and adds the
combination, scaled by ``lambda``, to the base. Operation order follows
mergekit 0.1.5 so recipes give its numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch

Consensus = Literal["sum", "count"]
Sparsifier = Callable[[torch.Tensor, int], torch.Tensor]

# Below this the weight sum counts as zero when normalising without consensus (as mergekit).
ZERO_WEIGHT_SUM = 1e-8


def combine_task_vectors(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: Consensus | None,
    normalize: bool,
    scale: float,
) -> torch.Tensor:
    """``base + scale * merged``, where merged is the (sign-agreeing, normalised) weighted sum."""
    stacked = torch.stack(list(deltas), dim=0)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    w = w.reshape((-1,) + (1,) * (stacked.dim() - 1))
    weighted = stacked * w
    if consensus is not None:
        agree = sign_agreement(weighted, consensus).to(stacked.dtype)
        merged = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        merged = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < ZERO_WEIGHT_SUM] = 1
    if normalize:
        merged = merged / divisor
    if scale != 1:
        merged = merged * scale
    return base + merged


def sign_agreement(weighted: torch.Tensor, method: Consensus) -> torch.Tensor:
    """Per model and entry: does its sign equal the elected sign? (zero never agrees)."""
    signs = weighted.sign()
    if method == "sum":
        elected = (weighted.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
    elif method == "count":
        elected = (signs.sum(dim=0) >= 0).to(weighted.dtype) * 2 - 1
    else:
        raise ValueError(f"unknown consensus method {method!r}; use 'sum' or 'count'")
    return signs == elected


def masked(delta: torch.Tensor, mask: torch.Tensor, rescale_l1: bool, eps: float = 1e-7) -> torch.Tensor:
    """``delta * mask``, optionally rescaled so its L1 norm equals the unmasked delta's."""
    kept = delta * mask
    if not rescale_l1:
        return kept
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before >= eps and after >= eps:
        kept = kept * (before / after)
    return kept


Sparsification = Literal["magnitude", "bernoulli", "breadcrumbs"]
TrimTies = Literal["sort", "keep"]
RescaleMode = Literal["l1", "inverse_density"]


def sparsify(
    delta: torch.Tensor,
    density: float,
    method: Sparsification,
    *,
    rescale: bool = False,
    rescale_mode: RescaleMode = "l1",
    gamma: float = 0.01,
    generator: torch.Generator | None = None,
    trim_ties: TrimTies = "sort",
) -> torch.Tensor:
    """Zeroes all but a ``density`` fraction of ``delta``; ``density >= 1`` keeps it whole.

    ``rescale`` restores the magnitude of what was dropped: ``"l1"`` (mergekit's
    default) matches the kept entries' L1 norm to the whole delta's, per tensor;
    ``"inverse_density"`` multiplies by ``1 / density`` (the DARE paper).
    """
    if density >= 1:
        return delta
    if method == "bernoulli":
        if generator is None:
            raise ValueError("random sparsification needs a seeded generator")
        # As mergekit: bf16 stays bf16, other CPU dtypes draw in float32.
        work = delta if delta.dtype == torch.bfloat16 or delta.device.type != "cpu" else delta.float()
        mask = bernoulli_mask(work, density, generator)
        return _rescaled(work, mask, rescale, rescale_mode, density).to(delta.dtype)
    if method == "magnitude":
        mask = magnitude_mask(delta, density, trim_ties)
    elif method == "breadcrumbs":
        mask = breadcrumbs_mask(delta, density, gamma)
    else:
        raise ValueError(f"unknown sparsification {method!r}")
    return _rescaled(delta, mask, rescale, rescale_mode, density)


def sparse_task_vectors(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    densities: Sequence[float],
    method: Sparsification,
    *,
    gammas: Sequence[float] | None = None,
    **options: object,
) -> list[torch.Tensor]:
    """``sparsify(x_i - base, density_i)`` for each model (``gammas`` per model for breadcrumbs).

    Large CPU tensors are sparsified in parallel threads, one per model: the
    magnitude sorts dominate TIES and breadcrumbs and each runs mostly on one core.
    """
    gammas = gammas if gammas is not None else [0.01] * len(tensors)

    def one(x: torch.Tensor, d: float, g: float) -> torch.Tensor:
        return sparsify(x - base, d, method, gamma=g, **options)  # type: ignore[arg-type]

    if base.device.type == "cpu" and base.numel() >= PARALLEL_SPARSIFY and len(tensors) > 1:
        return list(_pool().map(one, tensors, densities, gammas))
    return [one(x, d, g) for x, d, g in zip(tensors, densities, gammas)]


# Tensors at least this large are sparsified one model per thread.
PARALLEL_SPARSIFY = 1 << 20


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(2, torch.get_num_threads()), thread_name_prefix="sparsify")


def _rescaled(
    delta: torch.Tensor, mask: torch.Tensor, rescale: bool, mode: RescaleMode, density: float
) -> torch.Tensor:
    if rescale and mode == "inverse_density":
        return delta * mask / density if density > 0 else delta * mask
    return masked(delta, mask, rescale)


def magnitude_mask(delta: torch.Tensor, density: float, ties: TrimTies = "sort") -> torch.Tensor:
    """1 for the ``max(1, int(density * numel))`` entries of largest magnitude, 0 elsewhere.

    ``ties="sort"`` keeps exactly that many, breaking ties at the threshold as
    ``torch.argsort(descending=True)`` does, which is what mergekit does, so bf16
    merges match it entry for entry (a full sort: O(n log n)). ``ties="keep"``
    keeps every entry at or above the k-th largest magnitude, as the TIES
    paper's code, found by selection in O(n): several times faster on CPU.
    """
    mask = torch.zeros_like(delta)
    if density <= 0 or delta.numel() == 0:
        return mask
    # mergekit keeps at least one entry.
    k = max(1, int(density * delta.numel()))
    magnitudes = delta.abs().reshape(-1)
    if magnitudes.device.type == "cpu":
        magnitudes = magnitudes.float()
    if ties == "keep":
        threshold = torch.kthvalue(magnitudes, magnitudes.numel() - k + 1).values
        return (delta.abs() >= threshold.to(delta.dtype)).to(delta.dtype)
    top = torch.argsort(magnitudes, descending=True)[:k]
    mask.view(-1)[top] = 1
    return mask


def bernoulli_mask(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keeps each entry with probability ``density``, from a seeded generator."""
    probabilities = torch.full_like(delta, density)
    return torch.bernoulli(probabilities, generator=generator)


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Drops the largest ``gamma * n`` and the smallest ``n - density*n - gamma*n`` entries."""
    n = delta.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        bottom, top = 0, n - keep
    magnitudes = delta.abs().reshape(-1)
    if magnitudes.device.type == "cpu":
        magnitudes = magnitudes.float()
    order = torch.argsort(magnitudes, descending=False)
    mask = torch.zeros_like(delta)
    mask.view(-1)[order[bottom : n - top]] = 1
    return mask
