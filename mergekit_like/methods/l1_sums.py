"""DARE's L1 sums, taken the same way whether a tensor comes whole or in row blocks.

A float sum depends on the order of its additions, so a tensor summed whole and the same
tensor summed block by block would give rescale factors a bit apart. These sums are taken
over fixed units of the tensor's flat entries (``SUM_UNIT``, counted from its first entry):
each unit is summed by torch on its own (in float32 for 16-bit values), and the unit sums
are added exactly (``math.fsum``, rounded once). A unit split between two row blocks is
joined before it is summed, so the result depends on the values alone, never on the blocks.
"""

from __future__ import annotations

import math

import torch

SUM_UNIT = 1 << 20
# Below this an L1 norm counts as zero and the rescale is skipped (as mergekit).
L1_EPS = 1e-7


def _unit_sum(values: torch.Tensor) -> torch.Tensor:
    return values.sum(dtype=torch.float32 if values.dtype in (torch.bfloat16, torch.float16) else values.dtype)


class UnitSums:
    """The sum of a tensor's flat entries, fed in order in pieces of any size.

    The unit sums go into one buffer made at the start, and a unit split between pieces waits in
    one buffer of a unit: nothing small and long-lived is allocated between a stream's blocks (such
    allocations pin the heap and made a stream of 4 GiB grow by GBs)."""

    def __init__(self, numel: int) -> None:
        self._units = max(1, math.ceil(numel / SUM_UNIT))
        self._sums: torch.Tensor | None = None  # on the values' device: no copy to the host per unit
        self._count = 0
        self._carry: torch.Tensor | None = None  # the start of a unit that the next piece completes
        self._carried = 0

    def _append(self, values: torch.Tensor) -> None:
        if self._sums is None:
            self._sums = torch.zeros(self._units, dtype=torch.float64, device=values.device)
        self._sums[self._count] = _unit_sum(values)
        self._count += 1

    def add(self, values: torch.Tensor) -> None:
        """The next entries, flat; a piece that starts inside a unit completes the one carried."""
        start = 0
        if self._carried:
            assert self._carry is not None
            start = min(values.numel(), SUM_UNIT - self._carried)
            self._carry[self._carried : self._carried + start] = values[:start]
            self._carried += start
            if self._carried < SUM_UNIT:
                return
            self._append(self._carry)
            self._carried = 0
        whole_units = start + (values.numel() - start) // SUM_UNIT * SUM_UNIT
        for first in range(start, whole_units, SUM_UNIT):
            self._append(values[first : first + SUM_UNIT])
        if whole_units < values.numel():
            if self._carry is None or self._carry.dtype != values.dtype or self._carry.device != values.device:
                self._carry = torch.empty(SUM_UNIT, dtype=values.dtype, device=values.device)
            self._carried = values.numel() - whole_units
            self._carry[: self._carried] = values[whole_units:]

    def value(self) -> float:
        """The total, the last unit included (call once every entry was added)."""
        if self._carried:
            assert self._carry is not None
            self._append(self._carry[: self._carried])
            self._carried = 0
        return math.fsum(self._sums[: self._count].tolist()) if self._sums is not None else 0.0


class L1Sums:
    """``sum |d|`` and ``sum |d| * mask`` of one task vector, for DARE's L1 rescale."""

    def __init__(self, numel: int) -> None:
        self.before = UnitSums(numel)
        self.after = UnitSums(numel)
        self._offset = 0
        self._dtype: torch.dtype | None = None
        self._device: torch.device | None = None

    def add(self, deltas: torch.Tensor, mask: torch.Tensor) -> None:
        """The next flat entries of the task vector (in the dtype the rescale works in) and its mask."""
        self._dtype, self._device = deltas.dtype, deltas.device
        first = 0
        while first < deltas.numel():
            # Pieces end on unit boundaries: the temporaries are a unit's, and a unit is split only by blocks.
            stop = min(deltas.numel(), first + SUM_UNIT - (self._offset + first) % SUM_UNIT)
            magnitudes = deltas[first:stop].abs()
            self.before.add(magnitudes)
            self.after.add(magnitudes * mask[first:stop])
            first = stop
        self._offset += deltas.numel()

    def factor(self) -> torch.Tensor | None:
        """``before / after`` in the rescale's dtype, or None where either norm is (close to) zero."""
        if self._dtype is None:
            return None
        before = torch.tensor(self.before.value(), dtype=self._dtype, device=self._device)
        after = torch.tensor(self.after.value(), dtype=self._dtype, device=self._device)
        if before >= L1_EPS and after >= L1_EPS:
            return before / after
        return None
