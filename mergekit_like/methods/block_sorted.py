"""Exact trims (``trim_ties: sort``, breadcrumbs) of a tensor merged in row blocks.

Which entries an exact trim keeps follows the sort of the whole task vector, so no block can
decide it alone. But the sort needs only the magnitudes, not the models: a pass over the row
blocks per trimmed model gathers its task vector's flat magnitudes (in the compute dtype, entry
for entry those of the whole-tensor trim), its trim is made from them exactly as for a whole
tensor (the sort replayed in place, see :mod:`~mergekit_like.methods.sort_replay`) and they are
dropped; the merge pass slices each block's masks out of the trims. Memory holds one model's
magnitudes and one mask per model, not the tensor's models and their float copies (a pass per
model rather than one for all: the blocks are read again, every model's though one is used,
but three float32 magnitudes of a 32M-entry embedding held at once were 262 MB more; each
variant of a sweep gathers its own). On the CPU only: elsewhere the sort is the device's, of
the whole tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_like.methods.row_wise import RowOrder, flat_span
from mergekit_like.methods.task_vectors import (
    BREADCRUMBS_GAMMA,
    KEEP_ALL,
    RescaleMode,
    Sparsification,
    Trim,
    TrimTies,
    magnitude_trim,
)


class _SortedTrimReduction:
    """The exact trims of one tensor, a trimmed model per pass over its row blocks."""

    def __init__(self, method: Sparsification, params: Mapping[str, Any], numel: int) -> None:
        self.method = method
        self.densities = list(params.get("density", [1.0]))
        self.gammas = list(params.get("gamma", [BREADCRUMBS_GAMMA] * len(self.densities)))
        self.trim_ties: TrimTies = params.get("trim_ties", "sort")
        self.rescale = bool(params.get("rescale", False))
        self.rescale_mode: RescaleMode = params.get("rescale_mode", "l1")
        self.numel = numel
        self.trimmed = trimmed_models(params)  # the model of each pass
        self.trims: list[Trim] = [KEEP_ALL] * len(self.densities)
        self.magnitudes: torch.Tensor | None = None
        self._offset = 0
        self._order = RowOrder()

    def observe(self, pass_index: int, models: Sequence[torch.Tensor], base: torch.Tensor | None) -> None:
        assert base is not None
        start, end = self._offset, self._offset + base.numel()
        if self.magnitudes is None:
            self.magnitudes = torch.empty(self.numel, dtype=base.dtype)
        x = models[self.trimmed[pass_index]]
        torch.sub(x.reshape(-1), base.reshape(-1), out=self.magnitudes[start:end]).abs_()
        self._offset = end

    def end_pass(self, pass_index: int) -> None:
        i = self.trimmed[pass_index]
        if self.magnitudes is None or self._offset != self.numel:
            raise RuntimeError(f"a pass over row blocks gathered {self._offset:,} of {self.numel:,} magnitudes")
        magnitudes, self.magnitudes, self._offset = self.magnitudes, None, 0
        self.trims[i] = magnitude_trim(magnitudes, self.method, self.densities[i], gamma=self.gammas[i],
                                       trim_ties=self.trim_ties, rescale=self.rescale,
                                       rescale_mode=self.rescale_mode)

    def block(self, rows: tuple[int, int]) -> SortedBlock:
        self._order.take(rows)
        return SortedBlock(self.trims, rows)


def trimmed_models(params: Mapping[str, Any]) -> list[int]:
    """The models whose trims keep less than everything (kernel parameters)."""
    return [i for i, d in enumerate(params.get("density", [1.0])) if d < 1]


@dataclass(frozen=True)
class SortedBlock:
    """The exact trims of one row block: the whole tensor's, their masks cut to the block's entries."""

    whole: Sequence[Trim]
    rows: tuple[int, int]

    def trims(self, tensors: Sequence[torch.Tensor], base: torch.Tensor) -> list[Trim]:
        span = slice(*flat_span(self.rows, base))
        return [t if t.mask is None else dataclasses.replace(t, mask=t.mask[span]) for t in self.whole]


def exact_trim_blockwise(params: Mapping[str, Any], device_type: str) -> bool:
    """An exact trim merges in row blocks on the CPU, with every model's trim over the tensor's entries."""
    return device_type == "cpu" and params.get("trim_scope", "tensor") == "tensor"


@dataclass(frozen=True)
class BlockSortedTrims:
    """The tensor pass of an exact trim: ``method`` is ``"magnitude"`` (TIES' ``trim_ties: sort``) or
    ``"breadcrumbs"``."""

    method: Sparsification
    keyword: str = "block_trims"

    def blockwise(self, params: Mapping[str, Any], compute_dtype: torch.dtype, device_type: str) -> bool:
        return exact_trim_blockwise(params, device_type)

    def passes(self, params: Mapping[str, Any], compute_dtype: torch.dtype) -> int:
        return len(trimmed_models(params))

    def start(self, params: Mapping[str, Any], numel: int, device: torch.device, executor: Executor | None,
              generator: torch.Generator | None = None) -> _SortedTrimReduction:
        return _SortedTrimReduction(self.method, params, numel)
