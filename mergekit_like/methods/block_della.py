"""DELLA's drop over a tensor's row blocks: the same masks and rescale as the whole tensor's.

MAGPRUNE ranks each row on its own (along dim 1), so a block of rows has the whole tensor's
keep probabilities there. Its Bernoulli draws come from one generator, model after model, as
mergekit draws them: on the CPU a draw consumes the generator's stream entry by entry, so the
stream of model ``i`` starts where drawing the models before it leaves the generator, found by
drawing as many entries (without their tensors), and a block drawn after the blocks before it
continues that stream. The L1 rescale divides by sums over the whole tensor: one read pass
draws the masks and takes the sums (:class:`~mergekit_like.methods.l1_sums.L1Sums`), then the
merge pass draws each block's masks again from the same starts. On a GPU a draw's stream
depends on its size, so tensors merge whole there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_like.methods.l1_sums import L1Sums
from mergekit_like.methods.row_wise import RowOrder
from mergekit_like.methods.task_vectors import KEEP_ALL, Trim, della_mask, della_work_dtype

# The generator is advanced over a model's stream this many draws at a time (memory stays small).
ADVANCE_STEP = 1 << 22


def _draws(density: float) -> bool:
    """Whether a model with this density draws a mask (0 and 1 keep nothing and everything)."""
    return 0 < density < 1


def _advanced(generator: torch.Generator, draws: int, dtype: torch.dtype) -> None:
    """Moves ``generator`` past ``draws`` Bernoulli draws of ``dtype`` probabilities (float64 ones
    consume the stream otherwise than the narrower ones)."""
    for start in range(0, draws, ADVANCE_STEP):
        torch.bernoulli(torch.full((min(ADVANCE_STEP, draws - start),), 0.5, dtype=dtype), generator=generator)


class _DellaReduction:
    """Where each model's stream starts, and its L1 sums over one tensor's row blocks."""

    def __init__(self, params: Mapping[str, Any], numel: int, generator: torch.Generator) -> None:
        self.densities = list(params["density"])
        self.epsilons = list(params["epsilon"])
        self.rescale = bool(params["rescale"])
        self.numel = numel
        self.generator = generator
        self.starts: list[torch.Tensor] | None = None  # each model's generator state before its draw
        self.sums = [L1Sums(numel) if self.rescale and _draws(d) else None for d in self.densities]
        self.factors: list[torch.Tensor | None] = [None] * len(self.densities)
        self._pass_generators: list[torch.Generator] | None = None
        self._merge_generators: list[torch.Generator] | None = None
        self._order = RowOrder()

    def work_dtype(self, x: torch.Tensor, base: torch.Tensor) -> torch.dtype:
        # x - base's dtype, from the dtypes alone (no subtraction to find it).
        return della_work_dtype(torch.promote_types(x.dtype, base.dtype), base.device)

    def generators(self, work_dtype: torch.dtype) -> list[torch.Generator]:
        """A generator per model, at the start of its stream."""
        if self.starts is None:
            self.starts = []
            for density in self.densities:
                self.starts.append(self.generator.get_state())
                if _draws(density):
                    _advanced(self.generator, self.numel, work_dtype)
        generators = []
        for state in self.starts:
            generator = torch.Generator()
            generator.set_state(state)
            generators.append(generator)
        return generators

    def merge_generators(self, work_dtype: torch.dtype) -> list[torch.Generator]:
        """The merge pass's generators: made at its first block, kept for the blocks after it."""
        if self._merge_generators is None:
            self._merge_generators = self.generators(work_dtype)
        return self._merge_generators

    def mask(self, i: int, delta: torch.Tensor, work_dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
        return della_mask(delta, self.densities[i], self.epsilons[i], work_dtype, generator)

    def observe(self, pass_index: int, models: Sequence[torch.Tensor], base: torch.Tensor | None) -> None:
        assert base is not None
        if self._pass_generators is None:
            self._pass_generators = self.generators(self.work_dtype(models[0], base))
        for i, (x, sums) in enumerate(zip(models, self.sums)):
            if sums is not None:
                delta, work_dtype = x - base, self.work_dtype(x, base)
                sums.add(delta.to(work_dtype).reshape(-1), self.mask(i, delta, work_dtype, self._pass_generators[i]))

    def end_pass(self, pass_index: int) -> None:
        self.factors = [sums.factor() if sums is not None else None for sums in self.sums]

    def block(self, rows: tuple[int, int]) -> DellaBlock:
        self._order.take(rows)
        return DellaBlock(self)


@dataclass
class DellaBlock:
    """The DELLA trims of one row block (the blocks' draws continue one generator per model)."""

    reduction: _DellaReduction

    def trims(self, tensors: Sequence[torch.Tensor], base: torch.Tensor) -> list[Trim]:
        reduction = self.reduction
        generators = reduction.merge_generators(reduction.work_dtype(tensors[0], base))
        trims = []
        for i, (x, density) in enumerate(zip(tensors, reduction.densities)):
            if density >= 1:
                trims.append(KEEP_ALL)
            elif density <= 0:
                trims.append(Trim(torch.zeros(base.numel(), dtype=torch.bool, device=base.device)))
            else:
                work_dtype = reduction.work_dtype(x, base)
                delta_dtype = torch.promote_types(x.dtype, base.dtype)
                trims.append(Trim(reduction.mask(i, x - base, work_dtype, generators[i]), multiply=reduction.factors[i],
                                  work_dtype=None if work_dtype == delta_dtype else work_dtype))
        return trims


@dataclass(frozen=True)
class BlockDella:
    """The tensor pass of DELLA's drop (della, della_linear)."""

    keyword: str = "block_della"

    def blockwise(self, params: Mapping[str, Any], compute_dtype: torch.dtype, device_type: str) -> bool:
        return device_type == "cpu"

    def passes(self, params: Mapping[str, Any], compute_dtype: torch.dtype) -> int:
        return 1 if params["rescale"] and any(_draws(d) for d in params["density"]) else 0

    def start(self, params: Mapping[str, Any], numel: int, device: torch.device, executor: Executor | None,
              generator: torch.Generator | None) -> _DellaReduction:
        if generator is None:
            raise ValueError("DELLA's drop needs the tensor's seeded generator")
        return _DellaReduction(params, numel, generator)
