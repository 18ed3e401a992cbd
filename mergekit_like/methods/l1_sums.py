"""DARE's L1 sums, taken the same way whether a tensor comes whole or in row blocks.

Each unit of the tensor's flat entries (see :mod:`~mergekit_like.methods.flat_units`) is
summed by torch on its own (in float32 for 16-bit values), and the unit sums are added
exactly (``math.fsum``, rounded once): the result depends on the values alone, never on the blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from mergekit_like.methods import flat_units
from mergekit_like.methods.flat_units import UnitStream, unit_count

# Below this an L1 norm counts as zero and the rescale is skipped (as mergekit).
L1_EPS = 1e-7


def _unit_sum(values: torch.Tensor) -> torch.Tensor:
    return values.sum(dtype=torch.float32 if values.dtype in (torch.bfloat16, torch.float16) else values.dtype)


class UnitSums:
    """The sum of a tensor's flat entries, fed in order in pieces of any size.

    The unit sums go into one buffer made at the first unit, on the values' device (no copy to
    the host per unit)."""

    def __init__(self, numel: int) -> None:
        self._stream = UnitStream(numel=numel)
        self._units = unit_count(numel, self._stream.unit)
        self._sums: torch.Tensor | None = None

    def _sum(self, index: int, unit: Sequence[torch.Tensor]) -> None:
        (values,) = unit
        if self._sums is None:
            self._sums = torch.zeros(self._units, dtype=torch.float64, device=values.device)
        self._sums[index] = _unit_sum(values)

    def add(self, values: torch.Tensor) -> None:
        """The next entries, flat."""
        self._stream.add((values,), self._sum)

    def value(self) -> float:
        """The total, the last unit included (call once every entry was added)."""
        self._stream.finish(self._sum)
        return math.fsum(self._sums.tolist()) if self._sums is not None else 0.0


class L1Sums:
    """``sum |d|`` and ``sum |d| * mask`` of one task vector, for the L1 rescale of a sparsified task vector.

    Fed together (:meth:`add`, where the mask is known as the entries come) or in two passes
    (:meth:`add_before`, then :meth:`add_after` once a pass has found the mask)."""

    def __init__(self, numel: int) -> None:
        self.before = UnitSums(numel)
        self.after = UnitSums(numel)
        self._before_fed = 0  # how many entries each sum has taken
        self._after_fed = 0
        self._dtype: torch.dtype | None = None
        self._device: torch.device | None = None

    def _magnitudes(self, deltas: torch.Tensor, offset: int) -> Iterator[tuple[slice, torch.Tensor]]:
        """``|deltas|``, the entries from flat position ``offset`` on, in pieces that end on unit
        boundaries: the temporaries are a unit's, and a unit is split only by blocks."""
        self._dtype, self._device = deltas.dtype, deltas.device
        first, unit = 0, flat_units.SUM_UNIT
        while first < deltas.numel():
            stop = min(deltas.numel(), first + unit - (offset + first) % unit)
            yield slice(first, stop), deltas[first:stop].abs()
            first = stop

    def add(self, deltas: torch.Tensor, mask: torch.Tensor) -> None:
        """The next flat entries of the task vector (in the dtype the rescale works in) and its mask."""
        for piece, magnitudes in self._magnitudes(deltas, self._before_fed):
            self.before.add(magnitudes)
            self.after.add(magnitudes * mask[piece])
        self._before_fed = self._after_fed = self._before_fed + deltas.numel()

    def add_before(self, deltas: torch.Tensor) -> None:
        """The next flat entries of the task vector, for ``sum |d|``."""
        for _, magnitudes in self._magnitudes(deltas, self._before_fed):
            self.before.add(magnitudes)
        self._before_fed += deltas.numel()

    def add_after(self, deltas: torch.Tensor, mask: torch.Tensor) -> None:
        """The next flat entries of the task vector and its mask, for ``sum |d| * mask``."""
        for piece, magnitudes in self._magnitudes(deltas, self._after_fed):
            self.after.add(magnitudes * mask[piece])
        self._after_fed += deltas.numel()

    def factor(self) -> torch.Tensor | None:
        """``before / after`` in the rescale's dtype, or None where either norm is (close to) zero."""
        if self._dtype is None:
            return None
        before = torch.tensor(self.before.value(), dtype=self._dtype, device=self._device)
        after = torch.tensor(self.after.value(), dtype=self._dtype, device=self._device)
        if before >= L1_EPS and after >= L1_EPS:
            return before / after
        return None
