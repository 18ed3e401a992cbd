"""SCE: select the entries where task vectors differ most, weight by energy, erase minority signs.

Without a selection (``select_topk: 1``) everything but the energies (each task vector's mean
square over the tensor) is element-wise, so a large tensor merges in row blocks after one pass
that takes them: on a tensor over one unit of :mod:`~mergekit_like.methods.flat_units` the
squares (in the compute dtype, as mergekit squares) are summed unit by unit, the unit sums added
exactly and the mean rounded once, whether the tensor comes whole or in blocks; a tensor of one unit is
reduced as mergekit reduces it. A selection's ``torch.topk`` decides ties over the whole
tensor, so such tensors merge whole.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Annotated, Any

import torch

from mergekit_like.methods.declaration import Range, merge_method
from mergekit_like.methods.flat_units import UnitStream

# Below this the task vectors' total energy counts as zero and the weights are uniform (as mergekit).
ZERO_ENERGY = 1e-6
# The erased weights' sum is clamped here: an entry no model keeps adds nothing (as mergekit).
MIN_WEIGHT_SUM = 1e-6


def variance_top_k_mask(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 for the ``fraction`` of entries whose variance across models is largest, else 0.

    The fraction is of the entries with a nonzero variance, in the task vectors' dtype.
    """
    if fraction <= 0:
        return torch.zeros_like(task_vectors[0])
    if fraction >= 1:
        return torch.ones_like(task_vectors[0])
    variance = torch.var(task_vectors, dim=0, unbiased=False)
    # A float32 product, as mergekit's (count tensor times fraction): int() of it can differ
    # from the double product's near whole numbers.
    k = int(torch.count_nonzero(variance) * fraction)
    mask = torch.zeros_like(variance)
    if k == 0:
        return mask
    # torch.topk, as mergekit: it decides which of the entries tied at the threshold are kept.
    mask.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def sign_agreement(task_vectors: torch.Tensor) -> torch.Tensor:
    """Where each model's sign is the sign of the entry's sum over models (TIES' election; zero never agrees).

    On the stacked tensor, not model by model: the vote is one sum over models in torch's
    order, so an entry whose sum nearly cancels elects mergekit's sign.
    """
    votes = task_vectors.sum(dim=0)
    elected = (votes >= 0).to(task_vectors.dtype) * 2 - 1
    return task_vectors.sign() == elected


def energy_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """Each model's mean squared task vector, over their total (uniform when all are zero)."""
    energies = _Energies(task_vectors[0].numel(), task_vectors.shape[0])
    energies.add(list(task_vectors.reshape(task_vectors.shape[0], -1)))
    return weights_of(energies.finish(task_vectors.dtype, task_vectors.device))


def weights_of(energy: torch.Tensor) -> torch.Tensor:
    """The energies over their total (uniform when all are zero)."""
    # As mergekit, the total as a Python number decides the uniform fallback.
    total = torch.sum(energy).item()
    if abs(total) < ZERO_ENERGY:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class _Energies:
    """Each task vector's mean square over one flat tensor, fed in pieces (see the module's docstring)."""

    def __init__(self, numel: int, models: int) -> None:
        self.stream = UnitStream(numel=numel)
        self.numel = numel
        self.single = numel <= self.stream.unit
        self.unit_sums: list[list[float]] = [[] for _ in range(models)]
        self.whole: torch.Tensor | None = None

    def add(self, deltas: Sequence[torch.Tensor]) -> None:
        """The next flat entries of every task vector."""
        self.stream.add(deltas, self._unit)

    def _unit(self, index: int, unit: Sequence[torch.Tensor]) -> None:
        if self.single:
            self.whole = torch.stack(list(unit)).square().mean(dim=1)  # mergekit's reduction
            return
        # The squares in the compute dtype, as mergekit squares; each unit's sum in float32 for 16-bit ones.
        squares = torch.stack(list(unit)).square()
        for sums, total in zip(self.unit_sums, squares.sum(dim=1, dtype=_sum_dtype(squares.dtype)).tolist()):
            sums.append(total)

    def finish(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The energies, one per model, in the compute dtype."""
        self.stream.finish(self._unit)
        if self.whole is not None:
            return self.whole
        if self.single:  # an empty tensor: mean of nothing, as torch gives it
            return torch.full((len(self.unit_sums),), math.nan, dtype=dtype, device=device)
        return torch.tensor([math.fsum(sums) / self.numel for sums in self.unit_sums], dtype=dtype, device=device)


class _EnergyReduction:
    """The energies over one tensor's row blocks."""

    def __init__(self, numel: int) -> None:
        self.numel = numel
        self.energies: _Energies | None = None
        self.weights: torch.Tensor | None = None

    def observe(self, pass_index: int, models: Sequence[torch.Tensor], base: torch.Tensor | None) -> None:
        assert base is not None
        if self.energies is None:
            self.energies = _Energies(self.numel, len(models))
            self._dtype, self._device = torch.promote_types(models[0].dtype, base.dtype), base.device
        self.energies.add([(x - base).reshape(-1) for x in models])

    def end_pass(self, pass_index: int) -> None:
        assert self.energies is not None
        self.weights = weights_of(self.energies.finish(self._dtype, self._device))

    def block(self, rows: tuple[int, int]) -> torch.Tensor:
        if self.weights is None:
            raise RuntimeError("sce's row blocks need the pass over the tensor first")
        return self.weights


@dataclass(frozen=True)
class EnergyPass:
    """The tensor pass of sce without a selection: each task vector's weight from its energy."""

    keyword: str = "block_weights"

    def blockwise(self, params: Mapping[str, Any], compute_dtype: torch.dtype, device_type: str) -> bool:
        return params.get("select_topk", 1.0) >= 1

    def passes(self, params: Mapping[str, Any], compute_dtype: torch.dtype) -> int:
        return 1

    def start(self, params: Mapping[str, Any], numel: int, device: torch.device, executor: Executor | None,
              generator: torch.Generator | None = None) -> _EnergyReduction:
        return _EnergyReduction(numel)


@merge_method(
    "sce",
    inputs_as_stored=True,
    paper="https://arxiv.org/abs/2408.07990",
    description="Keep the top select_topk entries by variance across task vectors, weight each task vector by "
                "its mean square, erase minority signs.",
    ignored_params=("int8_mask",),  # it only picks the dtype of 0/1 masks: the same numbers either way
    tensor_pass=EnergyPass(),
)
def sce(
    tensors: list[torch.Tensor],
    *,
    base: torch.Tensor,
    select_topk: Annotated[float, Range(0, 1)] = 1.0,
    block_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    # Stacked, as mergekit: its reductions over models and entries then run in the same order.
    task_vectors = torch.stack([x - base for x in tensors])
    if select_topk < 1:
        task_vectors = task_vectors * variance_top_k_mask(task_vectors, select_topk)
    agree = sign_agreement(task_vectors)
    # A row block takes the weights from the pass over its tensor.
    weights = (block_weights if block_weights is not None else energy_weights(task_vectors)).reshape(
        -1, *[1] * base.dim())
    erased = weights * agree
    merged = (task_vectors * erased).sum(dim=0)
    return base + merged / erased.sum(dim=0).clamp(min=MIN_WEIGHT_SUM)
