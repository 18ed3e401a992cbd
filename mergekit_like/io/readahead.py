"""Read-pattern hints to the kernel (``posix_fadvise``): optional, never an error."""

from __future__ import annotations

import os

# Linux reads at most the device's read-ahead window (8 MiB here) per WILLNEED call, so
# a longer range is asked for window by window.
WILLNEED_STEP = 8 << 20


def advise(fd: int, offset: int, length: int, advice: str) -> None:
    """One hint (``"POSIX_FADV_SEQUENTIAL"``, ...); where the platform or file system has none, nothing."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        os.posix_fadvise(fd, offset, length, getattr(os, advice))
    except OSError:
        pass  # a hint only: reads work the same without it


def will_need(fd: int, offset: int, length: int) -> None:
    """Starts reading ``[offset, offset + length)`` into the page cache and returns."""
    for start in range(offset, offset + length, WILLNEED_STEP):
        advise(fd, start, min(WILLNEED_STEP, offset + length - start), "POSIX_FADV_WILLNEED")
