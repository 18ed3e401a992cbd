"""DARE's drop over a tensor's row blocks: the same masks and rescale as the whole tensor's.

A DARE mask is drawn in fixed units of the tensor's flat entries, each from a seed of its
own (see :func:`~mergekit_like.methods.task_vectors.bernoulli_mask`), so a row block draws
the units it covers and gets the whole mask's entries there. The L1 rescale divides by
sums over the whole tensor: one read pass over the blocks draws the masks and takes the
sums (:class:`~mergekit_like.methods.l1_sums.L1Sums`, which do not depend on the blocks),
then the merge pass draws each block's masks again. Without the L1 rescale no pass is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_like.methods.l1_sums import L1Sums
from mergekit_like.methods.row_wise import RowOrder, flat_span
from mergekit_like.methods.task_vectors import (
    KEEP_ALL,
    Trim,
    bernoulli_mask,
    dare_trim,
    dare_work_dtype,
    model_seed,
)


class _DropReduction:
    """Each model's DARE masks and L1 sums over one tensor's row blocks."""

    def __init__(self, params: Mapping[str, Any], numel: int, generator: torch.Generator,
                 executor: Executor | None) -> None:
        self.densities = list(params["density"])
        self.rescale = bool(params["rescale"])
        self.rescale_mode = params["rescale_mode"]
        self.numel = numel
        self.seeds = [model_seed(generator, i) for i in range(len(self.densities))]
        self.executor = executor
        self.sums = [L1Sums(numel) for _ in self.densities] if self.rescale and self.rescale_mode == "l1" else None
        self.factors: list[torch.Tensor | None] = [None] * len(self.densities)
        self._offset = 0
        self._order = RowOrder()

    def _mask(self, i: int, span: tuple[int, int], device: torch.device) -> torch.Tensor:
        return bernoulli_mask(self.numel, self.densities[i], self.seeds[i], device, self.executor, span)

    def observe(self, pass_index: int, models: Sequence[torch.Tensor], base: torch.Tensor | None) -> None:
        assert base is not None and self.sums is not None
        span = (self._offset, self._offset + base.numel())
        for i, (x, density) in enumerate(zip(models, self.densities)):
            if density >= 1:
                continue
            delta = x - base
            work_dtype = dare_work_dtype(delta.dtype, delta.device)
            work = delta if work_dtype is None else delta.to(work_dtype)
            self.sums[i].add(work.reshape(-1), self._mask(i, span, base.device))
        self._offset = span[1]

    def end_pass(self, pass_index: int) -> None:
        self._offset = 0
        if self.sums is not None:
            self.factors = [sums.factor() for sums in self.sums]

    def block(self, rows: tuple[int, int]) -> DropBlock:
        self._order.take(rows)
        return DropBlock(self, rows)


@dataclass(frozen=True)
class DropBlock:
    """The DARE trims of one row block."""

    reduction: _DropReduction
    rows: tuple[int, int]

    def trims(self, tensors: Sequence[torch.Tensor], base: torch.Tensor) -> list[Trim]:
        reduction = self.reduction
        span = flat_span(self.rows, base)
        trims = []
        for i, (x, density) in enumerate(zip(tensors, reduction.densities)):
            if density >= 1:
                trims.append(KEEP_ALL)
                continue
            # x - base's dtype, from the dtypes alone (no subtraction to find it).
            work_dtype = dare_work_dtype(torch.promote_types(x.dtype, base.dtype), base.device)
            trims.append(dare_trim(reduction._mask(i, span, base.device), density, reduction.rescale,
                                   reduction.rescale_mode, work_dtype, reduction.factors[i]))
        return trims


@dataclass(frozen=True)
class BlockDrop:
    """The tensor pass of DARE's drop (dare_ties, dare_linear)."""

    keyword: str = "block_drops"

    def blockwise(self, params: Mapping[str, Any], compute_dtype: torch.dtype, device_type: str) -> bool:
        return True

    def passes(self, params: Mapping[str, Any], compute_dtype: torch.dtype) -> int:
        l1 = params["rescale"] and params["rescale_mode"] == "l1"
        return 1 if l1 and any(d < 1 for d in params["density"]) else 0

    def start(self, params: Mapping[str, Any], numel: int, device: torch.device, executor: Executor | None,
              generator: torch.Generator | None) -> _DropReduction:
        if generator is None:
            raise ValueError("DARE's drop needs the tensor's seeded generator")
        return _DropReduction(params, numel, generator, executor)
