"""Process-wide memory settings for streaming whole models through a few tensors' worth of RAM."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

# glibc's mallopt parameter number for the mmap threshold.
_M_MMAP_THRESHOLD = -3
# Allocations at least this large get their own mapping and go back to the OS when freed.
MMAP_THRESHOLD = 1024 * 1024


def return_freed_tensors_to_the_os() -> bool:
    """Fixes glibc's mmap threshold at 1 MiB (Linux; a no-op elsewhere).

    glibc raises its threshold up to 32 MiB as large blocks are freed, after which
    tensors of a few MiB come from heap arenas (one per thread) that keep freed
    memory resident: streaming thousands of tensors through the reader and writer
    threads then holds more than the tensors in flight. The price is a page-fault
    and zeroing cost on every large allocation (the 270M linear merge benchmark:
    6.3 s and 384 MB with it, 3.7 s and 757 MB without). The CLI's
    ``--low-memory`` calls this; library users may call it too.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        logger.debug("mallopt is not available; allocator settings unchanged")
        return False
