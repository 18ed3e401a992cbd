"""Process-wide memory settings for streaming whole models through a few tensors' worth of RAM."""

from __future__ import annotations

import logging

from mergekit_like.io import libc

logger = logging.getLogger(__name__)

# glibc's mallopt parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# Allocations at least this large get their own mapping and go back to the OS when freed.
MMAP_THRESHOLD = 1024 * 1024


_returning_freed_memory = False  # set by return_freed_tensors_to_the_os: keep_freed_memory defers to it


def return_freed_tensors_to_the_os() -> bool:
    """Fixes glibc's mmap threshold at 1 MiB (Linux; a no-op elsewhere).

    glibc raises its threshold up to 32 MiB as large blocks are freed, after which
    tensors of a few MiB come from heap arenas that keep freed memory resident:
    streaming thousands of tensors through the reader and writer threads then
    holds more than the tensors in flight. The price is a page-fault and zeroing
    cost on every large allocation. The CLI's ``--low-memory`` calls this, and
    :func:`keep_freed_memory` then changes nothing; library users may call it too.
    """
    global _returning_freed_memory
    _returning_freed_memory = True
    return _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def keep_freed_memory() -> bool:
    """Makes glibc keep freed memory in the process for later allocations (Linux; a no-op elsewhere).

    By default an allocation over glibc's mmap threshold (at most 32 MiB) gets a fresh
    mapping that goes back to the OS when freed, so every such tensor starts with a
    page fault and a zeroing per 4 KiB page. With no mmap and no trimming, freed
    blocks stay in the heap and later tensors are carved from them: a stream of 40 to
    88 MiB tensors took 0 page faults instead of 967,740. The cost is memory: nothing
    freed goes back to the OS before the process ends, and blocks of mixed sizes
    fragment (a mixed-size loop: 726 MB peak RSS against 516 MB, while running 6x
    faster). It pays for element-wise merges, whose blocks are alike: the 1.1B linear
    merge (2 cores, cold cache, 512 MiB budget) took 17.9 s and 995 MB against 26.6 s and 929 MB. For
    whole-tensor methods (TIES) the RSS grew by a quarter, so the CLI calls this for
    element-wise merges only, and never after :func:`return_freed_tensors_to_the_os`.
    """
    if _returning_freed_memory:
        return False
    return _mallopt(_M_MMAP_MAX, 0) and _mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # mallopt takes a C int


def share_one_malloc_arena() -> bool:
    """Makes every thread allocate from one glibc heap arena (Linux; a no-op elsewhere).

    By default each thread that allocates gets an arena of its own, and what a
    thread frees stays resident in its arena for that thread alone: the reader
    frees input buffers the compute thread could have reused. With one arena,
    memory freed by any thread serves the next allocation. Measured on the 270M
    TIES merge (2 cores, two runs each): 13.8 s and 1,035 MB peak RSS against
    15.3 s and 1,115 MB. Call it before the first threads start; the CLI does.
    """
    return _mallopt(_M_ARENA_MAX, 1)


def _mallopt(parameter: int, value: int) -> bool:
    function = libc.mallopt()
    if function is None:
        logger.debug("mallopt is not available; allocator settings unchanged")
        return False
    return bool(function(parameter, value))
