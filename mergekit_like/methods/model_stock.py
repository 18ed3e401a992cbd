"""Model Stock: move from the base towards the fine-tunes' mean by their geometry.

The ratio t needs the task vectors' norms and dot products over the whole tensor (one ratio per
row for ``filter_wise``, where a row block holds whole rows and needs nothing more). On a tensor
over one unit of :mod:`~mergekit_like.methods.flat_units` they come from a Gram matrix per unit
(float32 for 16-bit compute dtypes), the units' matrices added in float64, and t is computed from
them in the compute dtype, so a tensor merged whole and one merged in row blocks after a pass over
them get the same t; a tensor of one unit is reduced as mergekit reduces it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import torch

from mergekit_like.methods import flat_units
from mergekit_like.methods.declaration import Amplification, merge_method
from mergekit_like.methods.flat_units import UnitStream

NORM_PRODUCT_EPS = 1e-6
SINGULAR = 1e-6
# CUDA's caching allocator starts its blocks on multiples of 512 bytes (the CPU's, of 64, which divides it).
ALLOCATION_ALIGNMENT = 512


def stock_ratio(deltas: list[torch.Tensor]) -> torch.Tensor:
    """t = n cos / (1 + (n - 1) cos), cos the mean pairwise cosine of the task vectors.

    ``deltas`` are flat (one ratio) or 2-D (one ratio per row). Where the
    denominator vanishes t is 0, which keeps the base (as mergekit).
    """
    norms = [torch.norm(d, dim=-1) for d in deltas]
    dots = {(i, j): (deltas[i] * deltas[j]).sum(-1) for i, j in combinations(range(len(deltas)), 2)}
    return ratio_from(norms, dots)


def ratio_from(norms: Sequence[torch.Tensor], dots: Mapping[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """t from the task vectors' norms and pairwise dot products (pairs ``i < j`` in order)."""
    cosines = [(dot / (norms[i] * norms[j]).clamp(min=NORM_PRODUCT_EPS)).clamp(-1, 1)
               for (i, j), dot in dots.items()]
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    n = len(norms)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), n * cos / safe)


class _Gram:
    """The task vectors' Gram matrix (squared norms and dot products) over one flat tensor, unit by
    unit, and t.

    Each unit's Gram matrix is one matrix product of its task vectors (in float32 for 16-bit compute
    dtypes, whose products it holds exactly), and the units' matrices are added in float64: the
    result depends on the values alone, not on how the tensor was cut. A tensor of one unit gets t
    from :func:`stock_ratio` itself, as mergekit reduces it.
    """

    def __init__(self, numel: int, models: int) -> None:
        self.stream = UnitStream(numel=numel)
        self.single = numel <= self.stream.unit
        self.models = models
        self.gram: torch.Tensor | None = None
        self.t: torch.Tensor | None = None

    def add(self, models: Sequence[torch.Tensor], base: torch.Tensor) -> None:
        self.stream.add([base.reshape(-1), *(x.reshape(-1) for x in models)], self._unit)

    def _unit(self, index: int, unit: Sequence[torch.Tensor]) -> None:
        rows, models = unit[0], unit[1:]
        # In the compute dtype, as mergekit subtracts; written straight into the stacked rows. For a
        # tensor of one unit, whose t comes from those rows, each row starts as far into an aligned
        # allocation as a tensor of its own: a GPU reduction picks its vectorised loads by the data's
        # alignment, and t must be the kernel's (mergekit's) to the bit.
        width = _aligned_width(rows.numel(), rows.element_size()) if self.single else rows.numel()
        deltas = rows.new_empty((len(models), width))[:, : rows.numel()]
        for x, out in zip(models, deltas):
            torch.sub(x, rows, out=out)
        if self.single:
            self.t = stock_ratio(list(deltas))
        work = deltas.float() if deltas.dtype in (torch.bfloat16, torch.float16) else deltas
        gram = (work @ work.T).double()
        self.gram = gram if self.gram is None else self.gram + gram

    def finish(self, dtype: torch.dtype, device: torch.device) -> StockBlock:
        """t in the compute dtype, and how far it moves the merge."""
        self.stream.finish(self._unit)
        gram = (self.gram if self.gram is not None else torch.zeros(self.models, self.models)).tolist()
        squares = [gram[i][i] for i in range(self.models)]
        dots = {(i, j): gram[i][j] for i, j in combinations(range(self.models), 2)}
        t = self.t if self.t is not None else ratio_from(
            [torch.tensor(math.sqrt(max(s, 0.0)), dtype=dtype, device=device) for s in squares],
            {pair: torch.tensor(dot, dtype=dtype, device=device) for pair, dot in dots.items()})
        return StockBlock(t, _amplification(float(t.reshape(-1)[0]), squares, dots))


def _aligned_width(numel: int, itemsize: int) -> int:
    """``numel`` rounded up so that rows of that many entries each start on an allocation boundary."""
    per_boundary = ALLOCATION_ALIGNMENT // itemsize
    return -(-numel // per_boundary) * per_boundary


def _amplification(t: float, squares: Sequence[float], dots: Mapping[tuple[int, int], float]) -> float:
    """|t| ||mean task vector|| / max ||task vector||, from the sums (see :func:`stock_amplification`)."""
    n = len(squares)
    mean_squared = (math.fsum(squares) + 2 * math.fsum(dots.values())) / (n * n)
    farthest = math.sqrt(max(squares))
    return abs(t) * math.sqrt(max(mean_squared, 0.0)) / farthest if farthest > 0 else 0.0


@dataclass(frozen=True)
class StockBlock:
    """What a row block of model_stock needs: the tensor's t (None: ``filter_wise``, each block's rows
    on their own), and the factor the merge moves it by (for the amplification warning)."""

    t: torch.Tensor | None
    amplification: float = 0.0


class _StockReduction:
    """t over one tensor's row blocks (``filter_wise``: nothing to reduce)."""

    def __init__(self, filter_wise: bool, numel: int) -> None:
        self.filter_wise, self.numel = filter_wise, numel
        self.gram: _Gram | None = None
        self.result = StockBlock(None)

    def observe(self, pass_index: int, models: Sequence[torch.Tensor], base: torch.Tensor | None) -> None:
        assert base is not None
        if self.gram is None:
            self.gram = _Gram(self.numel, len(models))
            self._dtype, self._device = base.dtype, base.device
        self.gram.add(models, base)

    def end_pass(self, pass_index: int) -> None:
        assert self.gram is not None
        self.result = self.gram.finish(self._dtype, self._device)

    def block(self, rows: tuple[int, int]) -> StockBlock:
        return self.result


@dataclass(frozen=True)
class StockPass:
    """The tensor pass of model_stock: the tensor's t from one pass (none for ``filter_wise``)."""

    keyword: str = "block_stock"

    def blockwise(self, params: Mapping[str, Any], compute_dtype: torch.dtype, device_type: str) -> bool:
        # A CUDA reduction along each row splits it according to how many rows it reduces at once.
        return not params.get("filter_wise", False) or device_type == "cpu"

    def passes(self, params: Mapping[str, Any], compute_dtype: torch.dtype) -> int:
        return 0 if params.get("filter_wise", False) else 1

    def whole(self, params: Mapping[str, Any]) -> bool:
        # One reduction gives t and the amplification factor, also for a tensor merged whole.
        return not params.get("filter_wise", False)

    def start(self, params: Mapping[str, Any], numel: int, device: torch.device, executor: Executor | None,
              generator: torch.Generator | None = None) -> _StockReduction:
        return _StockReduction(params.get("filter_wise", False), numel)


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
    result: torch.Tensor, tensors: list[torch.Tensor], *, base: torch.Tensor, filter_wise: bool = False,
    block_stock: StockBlock | None = None, **_: Any
) -> float:
    """How many times farther than its farthest fine-tune the merge moved from the base (the worst
    row for ``filter_wise``): at most 1 while the task vectors' mean cosine is positive, and
    without bound as ``1 + (n - 1) cos`` nears zero (nearly opposite task vectors).

    A row block of a ``filter_wise`` merge is measured as it is (the worst block holds the worst
    row); one of a whole-tensor ratio takes the tensor's factor from the pass's sums."""
    if block_stock is not None and block_stock.t is not None:
        return block_stock.amplification
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
    tensor_pass=StockPass(),
    # mergekit computes the same unbounded t, so this is a warning, not a refusal.
    amplification=Amplification(
        stock_amplification,
        says="{method}: tensor '{tensor}' moves {factor} times as far from the base as its farthest fine-tune "
             "(its task vectors point nearly opposite ways, so t = n cos / (1 + (n - 1) cos) is huge); "
             "mergekit computes the same",
    ),
)
def model_stock(tensors: list[torch.Tensor], *, base: torch.Tensor, filter_wise: bool = False,
                block_stock: StockBlock | None = None) -> torch.Tensor:
    shape = base.shape
    rows, models = _rows(base, tensors, filter_wise)
    if block_stock is not None and block_stock.t is not None:
        t = block_stock.t  # a row block: the tensor's t, from a pass over its blocks
    elif not filter_wise and base.numel() > flat_units.SUM_UNIT:
        gram = _Gram(base.numel(), len(models))
        gram.add(models, rows)
        whole = gram.finish(base.dtype, base.device)
        assert whole.t is not None
        t = whole.t
    else:
        t = stock_ratio([x - rows for x in models])
    # mergekit's t * (sum(models) / n) + (1 - t) * base, in place: the same bits (sum() starts from
    # 0, which turns a first -0.0 into +0.0, hence the add of 0), two allocations instead of seven.
    merged = models[0].add(0)
    for x in models[1:]:
        merged.add_(x)
    merged.div_(len(models)).mul_(t)
    return merged.add_((1 - t) * rows).reshape(shape)
