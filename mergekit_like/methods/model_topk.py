"""Exact top-k magnitude thresholds over a whole model, in bounded memory.

The original TIES code trims each task vector to its k largest entries over
the *whole model*, not per tensor. Holding every magnitude to sort them would
need the model in memory, so the k-th largest magnitude is found by a radix
selection over float32 bit patterns instead (non-negative floats order like
their bit patterns): one pass counts the high 16 bits of every |d| into 65,536
buckets and finds the bucket holding the k-th largest; a second pass counts
the low 16 bits of the entries in that bucket, which pins the exact value.
Two streaming passes, 65,536 counters per model, whatever the model's size.
"""

from __future__ import annotations

import torch

BUCKETS = 1 << 16


def _bits(magnitudes: torch.Tensor) -> torch.Tensor:
    return magnitudes.detach().float().reshape(-1).view(torch.int32).to(torch.int64)


class TopKThreshold:
    """Finds the k-th largest magnitude of a stream of tensors seen twice."""

    def __init__(self, k: int, device: torch.device | str = "cpu") -> None:
        self.k = k
        self._high = torch.zeros(BUCKETS, dtype=torch.int64, device=device)
        self._low = torch.zeros(BUCKETS, dtype=torch.int64, device=device)
        self._bucket: int | None = None
        self._above = 0  # entries in buckets above the chosen one

    def first_pass(self, delta: torch.Tensor) -> None:
        """Counts the high bits of ``|delta|``."""
        high = _bits(delta.abs()) >> 16
        self._high += torch.bincount(high, minlength=BUCKETS).to(self._high.device)

    def choose_bucket(self) -> None:
        """After the first pass: the bucket that holds the k-th largest magnitude."""
        from_top = self._high.flip(0).cumsum(0)
        index = int(torch.searchsorted(from_top, torch.tensor(self.k, device=from_top.device)).item())
        index = min(index, BUCKETS - 1)
        self._bucket = BUCKETS - 1 - index
        self._above = int(from_top[index - 1].item()) if index > 0 else 0

    def second_pass(self, delta: torch.Tensor) -> None:
        """Counts the low bits of the magnitudes inside the chosen bucket."""
        assert self._bucket is not None, "call choose_bucket() between the passes"
        bits = _bits(delta.abs())
        inside = bits[(bits >> 16) == self._bucket] & (BUCKETS - 1)
        self._low += torch.bincount(inside, minlength=BUCKETS).to(self._low.device)

    def threshold(self) -> float:
        """The k-th largest magnitude: keeping ``|d| >= threshold`` keeps at least k entries."""
        assert self._bucket is not None
        needed = self.k - self._above
        from_top = self._low.flip(0).cumsum(0)
        index = int(torch.searchsorted(from_top, torch.tensor(needed, device=from_top.device)).item())
        low = BUCKETS - 1 - min(index, BUCKETS - 1)
        bits = torch.tensor([(self._bucket << 16) | low], dtype=torch.int64).to(torch.int32)
        return float(bits.view(torch.float32).item())
