"""A tensor's magnitude top-k, decided over its row blocks, so TIES can merge it block by block.

TIES keeps each task vector's ``k = max(1, int(density * n))`` largest magnitudes. The k-th
largest is found by radix selection (:class:`~mergekit_like.methods.topk.TopKThreshold`) over
the blocks: one pass counts the high 16 bits of every magnitude, which settles a bfloat16
tensor; float16 and float32 take a second pass over the low bits inside the chosen bucket.
The merge pass then keeps, per block, what lies above that threshold, and of the entries
equal to it either all (``trim_ties: keep``) or the first ones in flat order until k are
kept (``trim_ties: index``, the order of a stable sort), counted across the blocks as they
come. The masks are those of the whole-tensor selection in :mod:`~mergekit_like.methods.topk`,
so the merge gives its bits; memory holds a block, never the tensor.

An L1 rescale divides by the sums of each task vector's magnitudes before and after the cut
(:class:`~mergekit_like.methods.l1_sums.L1Sums`, which do not depend on the blocks): the first
pass takes the sums before, one more pass after the selection those after. Exact ties
(``trim_ties: sort``) follow the order of a sort of the whole tensor: their pass gathers the
magnitudes (see :mod:`~mergekit_like.methods.block_sorted`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from mergekit_like.methods.block_sorted import BlockSortedTrims, trimmed_models
from mergekit_like.methods.declaration import TensorReduction
from mergekit_like.methods.l1_sums import L1Sums
from mergekit_like.methods.row_wise import RowOrder
from mergekit_like.methods.task_vectors import BLOCK, GPU_BLOCK, KEEP_ALL, Trim
from mergekit_like.methods.topk import TopKThreshold, inf_pattern, magnitude_bits, position_of_nth, top_k_count

FLOAT32_INF = inf_pattern(torch.float32)
# The compute dtypes whose magnitudes widen exactly to float32, the selection's key.
SELECTABLE = frozenset({torch.bfloat16, torch.float16, torch.float32})

T = TypeVar("T")


def _each_model(executor: Executor | None, work: Callable[[int], T], count: int, device: torch.device) -> list[T]:
    """``work(i)`` for every model, in the executor's threads on the CPU (bincounts and compares
    run on one core each)."""
    if executor is not None and device.type == "cpu" and count > 1:
        return list(executor.map(work, range(count)))
    return [work(i) for i in range(count)]


def _parts(x: torch.Tensor, base: torch.Tensor) -> Iterator[torch.Tensor]:
    """``|x - base|``, flat, a slice at a time: temporaries stay in cache, as in the merge's blocks.

    Entry by entry what the whole-tensor trim computes."""
    flat_x, flat_base = x.reshape(-1), base.reshape(-1)
    step = BLOCK if base.device.type == "cpu" else GPU_BLOCK
    for start in range(0, flat_base.numel(), step):
        yield (flat_x[start : start + step] - flat_base[start : start + step]).abs_()


@dataclass
class _ModelCut:
    """Where one model's trim cuts: keep magnitudes above ``threshold`` and ``ties_left`` of those equal to it."""

    threshold: int  # float32 bit pattern
    ties_left: int | None  # None: keep every tie (trim_ties: keep)
    multiply: torch.Tensor | None = None  # the L1 rescale's factor

    def mask(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """The flat mask of one row block; the blocks of a tensor come in order (ties are counted)."""
        out = torch.empty(base.numel(), dtype=torch.bool, device=base.device)
        start = 0
        for magnitudes in _parts(x, base):
            self.cut(magnitudes, out[start : start + magnitudes.numel()])
            start += magnitudes.numel()
        return out

    def cut(self, magnitudes: torch.Tensor, out: torch.Tensor) -> None:
        """The mask of the next magnitudes (flat, in order) into ``out``."""
        # Compared as the selection counted them: bfloat16 patterns are the high halves of the float32
        # ones (the threshold's low half is zero); float16 magnitudes widen (a NaN's pattern too).
        if magnitudes.dtype == torch.bfloat16:
            bits, threshold, inf = magnitude_bits(magnitudes), self.threshold >> 16, FLOAT32_INF >> 16
        else:
            bits, threshold, inf = magnitude_bits(magnitudes.float()), self.threshold, FLOAT32_INF
        nan = self.threshold > FLOAT32_INF  # every NaN is tied at a NaN threshold, whatever its payload
        if self.ties_left is None:
            torch.gt(bits, inf, out=out) if nan else torch.ge(bits, threshold, out=out)
            return
        out.zero_() if nan else torch.gt(bits, threshold, out=out)
        if self.ties_left == 0:
            return
        tied = bits > inf if nan else bits == threshold
        count = int(torch.count_nonzero(tied))
        if count <= self.ties_left:
            self.ties_left -= count
            out |= tied
            return
        cut = position_of_nth(tied, self.ties_left) + 1
        out[:cut] |= tied[:cut]
        self.ties_left = 0


class _NoneKept(_ModelCut):
    """Density 0: nothing is kept."""

    def __init__(self) -> None:
        super().__init__(threshold=0, ties_left=0)

    def mask(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return torch.zeros(base.numel(), dtype=torch.bool, device=base.device)


@dataclass
class BlockTrims:
    """The trims of one tensor's row blocks, made in row order (ties are counted across blocks)."""

    cuts: list[_ModelCut | Trim]
    executor: Executor | None = None
    order: RowOrder = field(default_factory=RowOrder)

    def at(self, rows: tuple[int, int]) -> BlockTrims:
        self.order.take(rows)
        return self

    def trims(self, tensors: Sequence[torch.Tensor], base: torch.Tensor) -> list[Trim]:
        """Each model's trim of the block in hand."""
        def one(i: int) -> Trim:
            cut = self.cuts[i]
            return cut if isinstance(cut, Trim) else Trim(cut.mask(tensors[i], base), multiply=cut.multiply)

        return _each_model(self.executor, one, len(tensors), base.device)


class _TopKReduction:
    """Each model's k-th largest task-vector magnitude over one tensor's row blocks, and for an L1
    rescale the sums of its magnitudes before and after the cut (in a last pass, once the cuts are known)."""

    def __init__(self, densities: Sequence[float], numel: int, keep_ties: bool, rescale: bool,
                 device: torch.device, executor: Executor | None) -> None:
        # Per model: a fixed trim (density 1 or 0), or the selector whose threshold makes its cut.
        self.models: list[Trim | _ModelCut | TopKThreshold] = [
            KEEP_ALL if density >= 1 else _NoneKept() if density <= 0 else
            TopKThreshold(top_k_count(density, numel), device) for density in densities]
        self.selectors = {i: m for i, m in enumerate(self.models) if isinstance(m, TopKThreshold)}
        self.sums = {i: L1Sums(numel) for i in self.selectors} if rescale else {}
        self.selection_passes = 0  # known from the compute dtype of the first block
        self.keep_ties = keep_ties
        self.executor = executor
        self._rescale_cuts: list[_ModelCut | Trim] = []
        self._trims: BlockTrims | None = None

    def observe(self, pass_index: int, models: Sequence[torch.Tensor], base: torch.Tensor | None) -> None:
        assert base is not None
        self.selection_passes = _selection_passes(base.dtype)
        selected = list(self.selectors)

        def count(j: int) -> None:
            i = selected[j]
            if pass_index == self.selection_passes:
                self._sum_kept(i, models[i], base)
                return
            selector = self.selectors[i]
            for magnitudes in _parts(models[i], base):
                selector.count_high(magnitudes) if pass_index == 0 else selector.count_low(magnitudes)
                if pass_index == 0 and self.sums:
                    self.sums[i].add_before(magnitudes)

        _each_model(self.executor, count, len(selected), base.device)

    def _sum_kept(self, i: int, x: torch.Tensor, base: torch.Tensor) -> None:
        cut = self._rescale_cuts[i]
        assert isinstance(cut, _ModelCut)
        for magnitudes in _parts(x, base):
            kept = torch.empty(magnitudes.numel(), dtype=torch.bool, device=magnitudes.device)
            cut.cut(magnitudes, kept)
            self.sums[i].add_after(magnitudes, kept)

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            for selector in self.selectors.values():
                selector.choose_bucket()
        if pass_index == self.selection_passes - 1 and self.sums:
            self._rescale_cuts = self._cuts()  # the rescale's pass counts ties with cuts of its own

    def block(self, rows: tuple[int, int]) -> BlockTrims:
        if self._trims is None:
            self._trims = BlockTrims(self._cuts(rescaled=True), self.executor)
        return self._trims.at(rows)

    def _cuts(self, rescaled: bool = False) -> list[_ModelCut | Trim]:
        return [self._cut(m, self.sums.get(i) if rescaled else None) if isinstance(m, TopKThreshold) else m
                for i, m in enumerate(self.models)]

    def _cut(self, selector: TopKThreshold, sums: L1Sums | None) -> _ModelCut:
        threshold, above = selector.threshold_and_above()
        above = 0 if threshold > FLOAT32_INF else above  # nothing lies above a NaN
        return _ModelCut(threshold, None if self.keep_ties else selector.k - above,
                         sums.factor() if sums is not None else None)


def _selection_passes(compute_dtype: torch.dtype) -> int:
    """A bfloat16 magnitude is settled by its high 16 bits; wider ones take a pass over the low bits."""
    return 1 if compute_dtype == torch.bfloat16 else 2


@dataclass(frozen=True)
class BlockTopK:
    """The tensor pass of TIES' magnitude trim (``trim_scope: tensor``): a radix selection for ``trim_ties``
    index or keep, the gathered magnitudes of :mod:`~mergekit_like.methods.block_sorted` for sort."""

    keyword: str = "block_trims"

    def blockwise(self, params: Mapping[str, Any], compute_dtype: torch.dtype, device_type: str) -> bool:
        if not trimmed_models(params):
            return True  # nothing trimmed: the merge is element-wise
        if _exact(params):
            return EXACT.blockwise(params, compute_dtype, device_type)
        return (compute_dtype in SELECTABLE and params.get("trim_scope", "tensor") == "tensor"
                and params.get("trim_ties") in ("index", "keep"))

    def passes(self, params: Mapping[str, Any], compute_dtype: torch.dtype) -> int:
        if not trimmed_models(params):
            return 0
        if _exact(params):
            return EXACT.passes(params, compute_dtype)
        return _selection_passes(compute_dtype) + bool(params.get("rescale", False))

    def start(self, params: Mapping[str, Any], numel: int, device: torch.device, executor: Executor | None,
              generator: torch.Generator | None = None) -> _TopKReduction | TensorReduction:
        if _exact(params):
            return EXACT.start(params, numel, device, executor, generator)
        return _TopKReduction(params.get("density", [1.0]), numel, params.get("trim_ties") == "keep",
                              bool(params.get("rescale", False)), device, executor)


# TIES' exact trim (mergekit's ties among equal magnitudes) gathers the magnitudes for the sort.
EXACT = BlockSortedTrims("magnitude")


def _exact(params: Mapping[str, Any]) -> bool:
    return params.get("trim_ties", "sort") == "sort"
