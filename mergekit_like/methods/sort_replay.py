"""Which entries a CPU ``torch.sort`` puts at a range of positions, without sorting everything.

An exact TIES or breadcrumbs trim keeps the entries that ``torch.argsort`` of the magnitudes puts
first (or in a middle range), and among entries of equal magnitude that choice is whatever the
sort's algorithm makes of them. On the CPU an unstable sort is libstdc++'s ``std::sort``, an
introsort: median-of-three quicksort partitions down to runs of 16 entries, then one insertion
sort. A partition only moves entries inside its run, so the set of entries that ends up in
positions ``lo..hi-1`` is decided by the partitions of the runs that hold ``lo`` or ``hi``; the
others (almost all the work of a sort) can be skipped. :func:`sorted_range_mask` replays just
those partitions, each as a handful of vectorised passes, and the final insertion sort of the two
runs of at most 16 entries it leaves, as a stable sort. Expected O(n) instead of O(n log n), and
4-byte positions instead of the sort's 8-byte indices.

The replay is checked against ``torch.argsort`` itself (tests compare the two on ties of every
kind); where it would need the introsort's heap-sort fallback it gives up and the caller sorts.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

# torch's own sort, for the check: as imported, whatever wraps torch.sort later.
_TORCH_SORT = torch.sort
# libstdc++'s std::sort leaves runs of at most this many entries to its final insertion sort.
INSERTION_RUN = 16


def sorted_range_mask(keys: torch.Tensor, lo: int, hi: int, descending: bool,
                      consume: bool = False) -> torch.Tensor | None:
    """True for the entries of the flat CPU ``keys`` that ``torch.sort(keys, descending=...)`` puts at
    positions ``lo`` to ``hi - 1``; None where the sort would fall back to a heap sort.

    ``keys`` must hold no NaN (the sort orders NaNs by rules this replay does not follow); any
    integer or float dtype whose order is the order to reproduce will do (16-bit magnitudes can
    be replayed as their int16 bit patterns). The replay is libstdc++'s algorithm: callers check
    :func:`replays_this_sort` first. ``consume`` replays in ``keys`` itself (contiguous)
    instead of a copy, leaving them in an order of no use; where the replay gives up they are
    put back as they were, for the caller's sort.
    """
    n = keys.numel()
    if keys.device.type != "cpu":
        raise ValueError("the replay reproduces the CPU sort only")
    lo, hi = max(0, lo), min(n, hi)
    mask = torch.zeros(n, dtype=torch.bool)
    if lo >= hi:
        return mask
    # In numpy: its comparisons and nonzero are several times faster than torch's on the CPU.
    flat = keys.detach().reshape(-1)
    if consume and not flat.is_contiguous():
        raise ValueError("keys replayed in place must be contiguous")
    work = flat.numpy() if consume else flat.numpy().copy()
    where = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    ends = [b for b in (lo, hi) if 0 < b < n]
    # Runs still to replay: (first, last, depth left before the heap-sort fallback).
    runs = [(0, n, depth_limit(n))] if n > 1 else []
    while runs:
        first, last, depth = runs.pop()
        if not any(first < b < last for b in ends):
            continue  # every entry of this run is on one side of each end: its order does not matter
        if last - first <= INSERTION_RUN:
            _insertion_sort(work, where, first, last, descending)
            continue
        if depth == 0:
            if consume:
                work[where] = work.copy()  # the entry at position i came from where[i]
            return None
        cut = _partition(work, where, first, last, descending)
        runs += [(cut, last, depth - 1), (first, cut, depth - 1)]
    mask.numpy()[where[lo:hi]] = True
    return mask


@functools.cache
def replays_this_sort() -> bool:
    """Whether this process's torch sorts on the CPU as the replay assumes (libstdc++'s introsort, as
    in Linux builds; other C++ libraries sort otherwise): checked once, against ``torch.sort`` itself,
    on ties of every kind in both directions. Where it does not, exact trims sort in full."""
    generator = torch.Generator().manual_seed(0)
    for values in (2, 7, 1000):
        keys = torch.randint(0, values, (3001,), generator=generator, dtype=torch.int32).float()
        for descending in (True, False):
            expected = torch.zeros(keys.numel(), dtype=torch.bool)
            expected[_TORCH_SORT(keys, descending=descending).indices[700:2100]] = True
            replayed = sorted_range_mask(keys, 700, 2100, descending)
            if replayed is None or not torch.equal(replayed, expected):
                return False
    return True


def depth_limit(n: int) -> int:
    """How many partitions deep std::sort goes before it heap-sorts a run: twice floor(log2(n))."""
    return 2 * (n.bit_length() - 1)


def _before(a: Any, b: Any, descending: bool) -> bool:
    """The sort's comparator: ``a`` goes strictly before ``b``."""
    return bool(a > b if descending else a < b)


def _partition(work: np.ndarray, where: np.ndarray, first: int, last: int, descending: bool) -> int:
    """One introsort step on ``work[first:last]`` (and the positions riding along): the median of
    three moved to ``first``, then the unguarded Hoare partition of the rest around it; the cut.

    The left scan stops at entries not before the pivot, the right scan at entries not after it,
    and the m-th stop from the left is swapped with the m-th from the right until they cross. The
    scans only ever pass entries they would not stop at, so the stops are those of the entries
    as they were: flagged once, then read a chunk at a time from each end, the swaps made as the
    pairs are found (temporaries of a chunk, and each end read only as far as the cut)."""
    _move_median_to_first(work, where, first, first + 1, first + (last - first) // 2, last - 1, descending)
    pivot = work[first]
    run, positions = work[first + 1 : last], where[first + 1 : last]
    at_most, at_least = _packed_flags(run, pivot, np.less_equal), _packed_flags(run, pivot, np.greater_equal)
    left = _Stops(at_most if descending else at_least, run.size, from_left=True)
    right = _Stops(at_least if descending else at_most, run.size, from_left=False)
    last_right = None  # the right stop of the last swap
    while (a := left.pending()) is not None and (b := right.pending()) is not None:
        pairs = min(a.size, b.size)
        crossed = np.flatnonzero(a[:pairs] >= b[:pairs])
        swaps = int(crossed[0]) if crossed.size else pairs
        if swaps:
            from_left, from_right = a[:swaps], b[:swaps]
            for array in (run, positions):
                moved = array[from_left]
                array[from_left] = array[from_right]
                array[from_right] = moved
            last_right = int(from_right[-1])
            left.consume(swaps)
            right.consume(swaps)
        if crossed.size:
            break
    # The left scan ends at its next stop or at the entry the last swap put on the right,
    # whichever comes first (a median-of-three pivot guarantees one of them).
    stops = [s for s in (left.next_stop(), last_right) if s is not None]
    if not stops:
        raise AssertionError("a median-of-three pivot always stops the left scan")
    return first + 1 + min(stops)


# Flags are read and compared this many entries at a time (a multiple of 8: whole bytes of packed bits).
CHUNK = 1 << 20


def _packed_flags(run: np.ndarray, pivot: Any, compare: Any) -> np.ndarray:
    """``compare(run, pivot)`` as packed bits (an eighth of a byte an entry), computed a chunk at a time."""
    packed = np.empty((run.size + 7) // 8, dtype=np.uint8)
    for start in range(0, run.size, CHUNK):
        packed[start // 8 : (start + CHUNK + 7) // 8] = np.packbits(compare(run[start : start + CHUNK], pivot))
    return packed


class _Stops:
    """The positions of the set flags (packed bits) of a run in order from one end, a chunk at a time."""

    def __init__(self, packed: np.ndarray, size: int, from_left: bool) -> None:
        self.packed, self.size, self.from_left = packed, size, from_left
        self.chunks = (self.size + CHUNK - 1) // CHUNK
        self.read = 0  # chunks read so far, from this end
        self.buffer: np.ndarray = np.empty(0, dtype=np.int64)

    def pending(self) -> np.ndarray | None:
        """The stops found but not yet consumed (reading the next chunks if none are); None at the end."""
        while self.buffer.size == 0:
            if self.read >= self.chunks:
                return None
            chunk = self.read if self.from_left else self.chunks - 1 - self.read
            start = chunk * CHUNK
            count = min(CHUNK, self.size - start)
            bits = np.unpackbits(self.packed[start // 8 : (start + count + 7) // 8], count=count)
            found = np.flatnonzero(bits.view(np.bool_)) + start  # as bools: several times faster
            self.buffer = found if self.from_left else found[::-1]
            self.read += 1
        return self.buffer

    def consume(self, count: int) -> None:
        self.buffer = self.buffer[count:]

    def next_stop(self) -> int | None:
        pending = self.pending()
        return int(pending[0]) if pending is not None else None


def _move_median_to_first(work: np.ndarray, where: np.ndarray, result: int, a: int, b: int, c: int,
                          descending: bool) -> None:
    """libstdc++'s ``__move_median_to_first``: the median of ``a``, ``b`` and ``c`` swapped into ``result``
    (which of equal entries is taken decides the sort's order among ties, so the tests are its own)."""
    va, vb, vc = work[a], work[b], work[c]
    if _before(va, vb, descending):
        median = b if _before(vb, vc, descending) else c if _before(va, vc, descending) else a
    else:
        median = a if _before(va, vc, descending) else c if _before(vb, vc, descending) else b
    for array in (work, where):
        array[[result, median]] = array[[median, result]]


def _insertion_sort(work: np.ndarray, where: np.ndarray, first: int, last: int, descending: bool) -> None:
    """The final insertion sort on a run no partition reaches further: a stable sort (insertion moves
    an entry only past entries strictly after it, and never out of its run)."""
    segment = work[first:last]
    if descending:
        # Stable and descending without negating (unsigned keys, the smallest signed one): the
        # ascending stable order of the reversed run, read backwards, keeps equal entries in order.
        order = segment.size - 1 - np.argsort(segment[::-1], kind="stable")[::-1]
    else:
        order = np.argsort(segment, kind="stable")
    work[first:last] = segment[order]
    where[first:last] = where[first:last][order]
