"""A tensor's flat entries in fixed units, whether the tensor comes whole or in row blocks.

A float reduction depends on the order of its additions, so a statistic summed over a whole
tensor and the same statistic summed block by block would differ in the last bits. Reductions
that must give one answer either way (DARE's L1 sums, model_stock's cosines, slerp's norms)
reduce fixed units of the flat entries, counted from the tensor's first entry, each on its own,
and combine the unit results in one fixed way. A :class:`UnitStream` cuts the units out of
pieces of any size; a unit split between two row blocks is joined before it is reduced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

# The unit of the reductions that do not follow another tool's chunking.
SUM_UNIT = 1 << 20

# Bytes: the widest vector load of a GPU reduction.
ALIGNMENT = 16

# Called with a unit's index and its entries, one flat tensor per stream.
UnitReducer = Callable[[int, Sequence[torch.Tensor]], None]


def unit_count(numel: int, unit: int) -> int:
    """How many units a tensor of ``numel`` entries has."""
    return math.ceil(numel / unit)


class UnitStream:
    """Aligned flat streams (a tensor's entries, or several tensors' entries side by side), fed in
    order in pieces of any size and handed to a reducer one unit at a time.

    A unit started by one piece and completed by the next waits in one buffer of a unit per stream,
    made once: nothing small and long-lived is allocated between a stream's blocks (such
    allocations pin the heap and made a stream of 4 GiB grow by GBs).
    """

    def __init__(self, unit: int | None = None, numel: int | None = None) -> None:
        self.unit = unit if unit is not None else SUM_UNIT
        # A tensor smaller than a unit needs a carry only as large as itself.
        self._carry_size = self.unit if numel is None else max(1, min(self.unit, numel))
        self._index = 0
        self._carry: list[torch.Tensor] = []  # the start of the unit that the next piece completes
        self._carried = 0

    def add(self, pieces: Sequence[torch.Tensor], reduce: UnitReducer) -> None:
        """The next entries of every stream, flat and of one length; ``reduce`` takes each unit they
        complete. (Passed per call, not kept: an owner's bound method kept here would make a reference
        cycle, and the owner's buffers would wait for the garbage collector: a 270M DARE-TIES merge held
        about 300 MB more.)"""
        length = pieces[0].numel()
        start = 0
        if self._carried:
            start = min(length, self.unit - self._carried)
            for carry, piece in zip(self._carry, pieces):
                carry[self._carried : self._carried + start] = piece[:start]
            self._carried += start
            if self._carried < self.unit:
                return
            self._emit(self._carry, reduce)
            self._carried = 0
        whole_units = start + (length - start) // self.unit * self.unit
        for first in range(start, whole_units, self.unit):
            self._emit([piece[first : first + self.unit] for piece in pieces], reduce)
        if whole_units < length:
            if not self._fits(pieces):
                self._carry = [torch.empty(self._carry_size, dtype=p.dtype, device=p.device) for p in pieces]
            self._carried = length - whole_units
            for carry, piece in zip(self._carry, pieces):
                carry[: self._carried] = piece[whole_units:]

    def finish(self, reduce: UnitReducer) -> None:
        """Reduces the last unit, which may be short (call once every entry was added)."""
        if self._carried:
            self._emit([carry[: self._carried] for carry in self._carry], reduce)
            self._carried = 0
        self._carry = []  # not held through the rest of the merge

    def _fits(self, pieces: Sequence[torch.Tensor]) -> bool:
        return len(self._carry) == len(pieces) and all(
            c.dtype == p.dtype and c.device == p.device for c, p in zip(self._carry, pieces))

    def _emit(self, unit: Sequence[torch.Tensor], reduce: UnitReducer) -> None:
        # A GPU reduction takes another order over a start that is not aligned for its vector loads:
        # a unit cut from the middle of a row block is copied to a fresh (aligned) buffer there,
        # as units of a whole tensor start aligned.
        reduce(self._index, [u.clone() if u.device.type != "cpu" and u.data_ptr() % ALIGNMENT else u
                                  for u in unit])
        self._index += 1
