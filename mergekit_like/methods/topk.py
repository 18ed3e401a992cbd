"""Exact k-th largest magnitudes by radix selection, for one tensor or a whole model.

Non-negative floats order like their bit patterns, so the k-th largest
magnitude can be found by counting bit patterns instead of sorting: O(n) and a
few hundred KB of counters, where a sort is O(n log n) with an 8-byte index per
entry. For 16-bit dtypes one count over the 32,768 patterns of ``|x|`` pins the
value; float32 takes two counts (the high 16 bits, then the low 16 bits of the
entries inside the chosen high bucket). NaN magnitudes count as the largest,
as they do in ``torch.argsort(descending=True)``.

:class:`TopKThreshold` runs the float32 form over a stream of tensors seen
twice: the original TIES code trims over the whole model, which cannot be held
in memory to sort.
"""

from __future__ import annotations

import math
from typing import Literal, overload

import torch

BUCKETS = 1 << 16
# Tensors from this size up find their threshold from a sample first (see select_top_k).
SAMPLED_MIN = 1 << 18
SAMPLE_SIZE = 1 << 13
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


def top_k_count(density: float, numel: int) -> int:
    """How many entries a magnitude trim keeps: ``max(1, int(density * numel))`` (mergekit keeps at least one)."""
    return max(1, int(density * numel))


def magnitude_bits(magnitudes: torch.Tensor) -> torch.Tensor:
    """The flat bit patterns of non-negative floats, as integers that order like the floats."""
    flat = magnitudes.detach().reshape(-1)
    if flat.dtype not in _BITS:
        raise TypeError(f"magnitudes must be a floating dtype, not {flat.dtype}")
    return flat.view(_BITS[flat.dtype])


def _float32_bits(magnitudes: torch.Tensor) -> torch.Tensor:
    return magnitude_bits(magnitudes.detach().float())


def _bucket_from_top(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest entry (counts indexed by pattern), and the count above it."""
    from_top = counts.flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, torch.tensor(k, device=from_top.device)).item())
    index = min(index, counts.numel() - 1)
    above = int(from_top[index - 1].item()) if index > 0 else 0
    return counts.numel() - 1 - index, above


def kth_largest_bits(magnitudes: torch.Tensor, k: int) -> int:
    """The bit pattern (see :func:`magnitude_bits`) of the k-th largest of ``magnitudes``, 1 <= k <= numel."""
    bits = magnitude_bits(magnitudes)
    if not 1 <= k <= bits.numel():
        raise ValueError(f"k={k} is outside 1..{bits.numel()}")
    if bits.dtype == torch.int16:
        pattern, _ = _bucket_from_top(torch.bincount(bits.to(torch.int32), minlength=1 << 15), k)
        return pattern
    if bits.dtype == torch.int64:  # float64: rare enough for a selection
        return int(torch.kthvalue(bits, bits.numel() - k + 1).values.item())
    selector = TopKThreshold(k, bits.device)
    selector.count_high(magnitudes)
    selector.choose_bucket()
    selector.count_low(magnitudes)
    return selector.threshold_bits()


@overload
def top_k_mask(magnitudes: torch.Tensor, k: int, ties: Literal["index", "keep"] = "index") -> torch.Tensor: ...


@overload
def top_k_mask(magnitudes: torch.Tensor, k: int, ties: Literal["unambiguous"]) -> torch.Tensor | None: ...


def top_k_mask(
    magnitudes: torch.Tensor, k: int, ties: Literal["index", "keep", "unambiguous"] = "index"
) -> torch.Tensor | None:
    """True for the k largest of the flat, non-negative ``magnitudes`` (1 <= k <= numel), in O(n).

    ``ties="index"`` keeps exactly k, the lowest indices first among entries equal to the
    k-th largest (a stable sort's order); ``"keep"`` keeps all of those; ``"unambiguous"``
    returns the mask only when no tie decides which entries are the k largest (every entry
    equal to the k-th largest is among them) and None otherwise, so that any way of breaking
    ties, a sort's included, gives that mask.

    A large tensor starts from a guess: the k-th largest of a fixed random sample. Checking
    it takes the two comparisons the mask is made of anyway, and it is right whenever the
    true threshold is shared by many entries, which quantised weights (bf16 inputs) make
    common. Otherwise the sample brackets the threshold (several standard deviations each
    side) and the selection finishes on the entries inside the bracket; a radix selection
    decides should the bracket miss.
    """
    bits = magnitude_bits(magnitudes)
    n = bits.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is outside 1..{n}")
    threshold: int | None = None
    above: torch.Tensor | None = None
    tied: torch.Tensor | None = None
    count_above = 0
    if n >= SAMPLED_MIN:
        ordered = _sample(bits).sort(descending=True).values
        rank = k / n * SAMPLE_SIZE
        threshold = int(ordered[min(int(rank), SAMPLE_SIZE - 1)])
        if ties == "unambiguous" and int((ordered == threshold).sum()) > 1:
            return None  # a tie inside the sample: the whole tensor surely has a tie group there
        above, tied = bits > threshold, bits == threshold
        count_above = int(torch.count_nonzero(above))
        if not count_above < k <= count_above + int(torch.count_nonzero(tied)):
            threshold = _bracketed_kth_largest(bits, k, ordered, rank)
            above = tied = None
    if threshold is None:
        threshold = kth_largest_bits(magnitudes, k)
    if above is None or tied is None:
        above, tied = bits > threshold, bits == threshold
        count_above = int(torch.count_nonzero(above))
    if _is_nan_pattern(threshold, magnitudes.dtype):
        if ties == "unambiguous":
            return None  # NaN payloads differ in bits but are equal to a sort
        # Every NaN is the k-th largest, whatever its payload (a payload is no value, and the same
        # subtraction on a slice can give another): none lies above, all are tied.
        above, tied, count_above = torch.zeros_like(tied), bits > inf_pattern(magnitudes.dtype), 0
    if ties == "keep":
        return above.logical_or_(tied)
    if ties == "unambiguous":
        count_tied = int(torch.count_nonzero(tied))
        if count_above + count_tied != k:
            return None
        return above.logical_or_(tied)
    cut = position_of_nth(tied, k - count_above) + 1
    above[:cut] |= tied[:cut]
    return above


def inf_pattern(dtype: torch.dtype) -> int:
    """The :func:`magnitude_bits` pattern of +inf in ``dtype``: every larger pattern is a NaN."""
    return int(magnitude_bits(torch.tensor([math.inf], dtype=dtype)).item())


def _is_nan_pattern(pattern: int, dtype: torch.dtype) -> bool:
    """Whether a bit pattern of :func:`magnitude_bits` for ``dtype`` is a NaN."""
    value = torch.tensor([pattern], dtype=torch.int64).to(_BITS[dtype]).view(dtype)
    return bool(torch.isnan(value).item())


def _sample(bits: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator(device=bits.device).manual_seed(0)  # fixed: runs repeat exactly
    return bits[torch.randint(bits.numel(), (SAMPLE_SIZE,), generator=generator, device=bits.device)]


def _bracketed_kth_largest(bits: torch.Tensor, k: int, ordered: torch.Tensor, rank: float) -> int | None:
    """The k-th largest pattern, found inside a bracket around the sample's; None if it misses."""
    margin = 6 * (rank * (1 - rank / SAMPLE_SIZE)) ** 0.5 + 16
    lo = int(ordered[min(int(rank + margin), SAMPLE_SIZE - 1)])
    if rank - margin < 1:  # no upper bound
        above, inside = 0, bits >= lo
    else:
        hi = int(ordered[int(rank - margin)])
        above, inside = int(torch.count_nonzero(bits > hi)), (bits >= lo) & (bits <= hi)
    candidates = bits[inside]
    needed = k - above
    if not 1 <= needed <= candidates.numel():
        return None
    return int(torch.kthvalue(candidates, candidates.numel() - needed + 1).values)


def position_of_nth(flags: torch.Tensor, nth: int) -> int:
    """The flat index of the nth (1-based) True in ``flags``, which holds at least nth.

    Counted in coarse, then fine chunks (counting is several times cheaper than listing
    every True's index, and there can be millions of ties), then listed in one small chunk.
    """
    start, stop = 0, flags.numel()
    for chunk in (1 << 20, 1 << 14):
        for first in range(start, stop, chunk):
            found = int(torch.count_nonzero(flags[first : first + chunk]))
            if found >= nth:
                start, stop = first, min(first + chunk, stop)
                break
            nth -= found
    return start + int(flags[start:stop].nonzero()[nth - 1])


class TopKThreshold:
    """Finds the k-th largest float32 magnitude of a stream of tensors seen twice."""

    def __init__(self, k: int, device: torch.device | str = "cpu") -> None:
        self.k = k
        self._high = torch.zeros(BUCKETS, dtype=torch.int64, device=device)
        self._low = torch.zeros(BUCKETS, dtype=torch.int64, device=device)
        self._bucket: int | None = None
        self._above = 0  # entries in buckets above the chosen one
        self._low_counted = False

    def first_pass(self, delta: torch.Tensor) -> None:
        """Counts the high bits of ``|delta|``."""
        self.count_high(delta.abs())

    def second_pass(self, delta: torch.Tensor) -> None:
        """Counts the low bits of the magnitudes of ``delta`` inside the chosen bucket."""
        self.count_low(delta.abs())

    def count_high(self, magnitudes: torch.Tensor) -> None:
        # A bfloat16 pattern is the high half of its float32 one: counted without widening.
        high = magnitude_bits(magnitudes) if magnitudes.dtype == torch.bfloat16 else _float32_bits(magnitudes) >> 16
        self._high += torch.bincount(high, minlength=BUCKETS).to(self._high.device)

    def choose_bucket(self) -> None:
        """After the first pass: the bucket that holds the k-th largest magnitude."""
        self._bucket, self._above = _bucket_from_top(self._high, self.k)

    def count_low(self, magnitudes: torch.Tensor) -> None:
        if self._bucket is None:
            raise RuntimeError("call choose_bucket() between the passes")
        bits = _float32_bits(magnitudes)
        inside = bits[(bits >> 16) == self._bucket] & (BUCKETS - 1)
        self._low += torch.bincount(inside, minlength=BUCKETS).to(self._low.device)
        self._low_counted = True

    def threshold_and_above(self) -> tuple[int, int]:
        """The k-th largest's float32 bit pattern, and how many entries lie strictly above it.

        Without :meth:`count_low` the chosen bucket is taken as the value: right when every
        magnitude's low 16 bits are zero (bfloat16 values, widened), which one pass settles.
        """
        if self._bucket is None:
            raise RuntimeError("call choose_bucket() first")
        if not self._low_counted:
            return self._bucket << 16, self._above
        low, above = _bucket_from_top(self._low, self.k - self._above)
        return (self._bucket << 16) | low, self._above + above

    def threshold_bits(self) -> int:
        if self._bucket is None:
            raise RuntimeError("call choose_bucket() and count_low() first")
        low, _ = _bucket_from_top(self._low, self.k - self._above)
        return (self._bucket << 16) | low

    def threshold(self) -> float:
        """The k-th largest magnitude: keeping ``|d| >= threshold`` keeps at least k entries."""
        bits = torch.tensor([self.threshold_bits()], dtype=torch.int64).to(torch.int32)
        return float(bits.view(torch.float32).item())
