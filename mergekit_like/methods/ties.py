"""TIES: trim each task vector, elect a sign per entry, average the agreeing entries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch

from mergekit_like.methods.block_sorted import SortedBlock
from mergekit_like.methods.block_topk import BlockTopK, BlockTrims
from mergekit_like.methods.declaration import (
    NONNEGATIVE_WEIGHT,
    PerModel,
    Range,
    each,
    merge_method,
    weights_do_not_cancel,
)
from mergekit_like.methods.task_vectors import (
    KEEP_ALL,
    Consensus,
    TrimTies,
    make_trims,
    merge_task_vectors,
    threshold_trim,
)
from mergekit_like.methods.topk import TopKThreshold, top_k_count


class _ModelTopKReduction:
    """Each model's k-th largest task-vector magnitude over the whole model (two passes)."""

    def __init__(self, densities: Sequence[float], numel: int, device: torch.device) -> None:
        self.densities = list(densities)
        self.selectors = [TopKThreshold(top_k_count(d, numel), device) for d in self.densities]

    def observe(self, pass_index: int, models: Sequence[torch.Tensor], base: torch.Tensor | None) -> None:
        if base is None:
            raise ValueError("trim_scope 'model' needs the base model")
        for selector, model in zip(self.selectors, models):
            delta = (model - base).to(base.dtype)
            selector.first_pass(delta) if pass_index == 0 else selector.second_pass(delta)

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            for selector in self.selectors:
                selector.choose_bucket()

    def result(self) -> list[float]:
        return [s.threshold() if d < 1 else 0.0 for s, d in zip(self.selectors, self.densities)]


@dataclass(frozen=True)
class ModelTopK:
    """The original TIES trim (``trim_scope: model``): a top-k over the whole model per task vector."""

    keyword: str = "thresholds"
    passes: int = 2

    def needed(self, params: Sequence[Mapping[str, Any]]) -> bool:
        return any(p.get("trim_scope") == "model" for p in params)

    def problems(self, params: Sequence[Mapping[str, Any]]) -> list[str]:
        problems = []
        if len({p.get("trim_scope") for p in params}) > 1:
            problems.append("trim_scope must be the same for every tensor (it is 'model' for some only)")
        if len({tuple(p["density"]) for p in params}) > 1:
            problems.append("trim_scope: model keeps the top density fraction of the whole model, so each "
                            "model needs one density for all tensors (no gradients or filters)")
        return problems

    def start(self, params: Mapping[str, Any], numel: int, device: torch.device) -> _ModelTopKReduction:
        return _ModelTopKReduction(params["density"], numel, device)


@merge_method(
    "ties",
    checks=(weights_do_not_cancel,),
    inputs_as_stored=True,
    paper="https://arxiv.org/abs/2306.01708",
    description="Trim task vectors to their largest entries, elect signs, disjoint mean.",
    ignored_params=("int8_mask",),
    prepass=ModelTopK(),
    tensor_pass=BlockTopK(),
)
def ties(
    tensors: list[torch.Tensor],
    *,
    base: torch.Tensor,
    weight: Annotated[PerModel[float], NONNEGATIVE_WEIGHT],
    density: Annotated[PerModel[float], Range(0, 1)] = each(1.0),
    normalize: bool = True,
    rescale: bool = False,
    lambda_: float = 1.0,
    consensus: Consensus = "sum",
    trim_scope: Literal["tensor", "model"] = "tensor",
    trim_ties: TrimTies = "sort",
    thresholds: list[float] | None = None,
    block_trims: BlockTrims | SortedBlock | None = None,
    executor: Executor | None = None,
) -> torch.Tensor:
    if block_trims is not None:
        # A row block of a large tensor: the trims' thresholds come from a pass over all its blocks.
        trims = block_trims.trims(tensors, base)
    elif trim_scope == "model":
        # Keep |d| at or above the model-wide k-th largest magnitude, as the original TIES code.
        if thresholds is None:
            raise ValueError("trim_scope 'model' needs the model-wide thresholds")
        trims = [KEEP_ALL if d >= 1 else threshold_trim(x, base, t, rescale)
                 for x, t, d in zip(tensors, thresholds, density)]
    else:
        trims = make_trims(tensors, base, density, "magnitude", rescale=rescale, trim_ties=trim_ties,
                           executor=executor)
    return merge_task_vectors(base, tensors, weight, trims, consensus=consensus, normalize=normalize, scale=lambda_)
