"""glibc's allocator settings for streaming whole models through a few tensors' worth of RAM.

They are process-wide by nature, so the library never sets them on its own: a merge
applies the policy its options name (:func:`apply_allocator`), and the CLI chooses it.
Figures behind each setting are in ``benchmarks/results/``.
"""

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
# The same, for merges with row blocks of whole-tensor methods: above their slices' temporaries.
ROW_BLOCK_MMAP_THRESHOLD = 8 * 1024 * 1024
# glibc's largest mmap threshold on 64-bit hosts (mallopt refuses more).
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024
# A trim threshold the heap never reaches (mallopt takes a C int).
NO_TRIM = 2**31 - 1
# What glibc and c10 add to a request before comparing it with the mmap threshold, with room to spare.
ALLOCATION_OVERHEAD = 4096


def apply_allocator(policy: str, *, elementwise: bool, row_blocks: float = 0.0, whole_tensor_bytes: int = 0) -> None:
    """Applies a merge's allocator policy (see ``MergeOptions.allocator``).

    ``"fast"`` keeps freed memory for element-wise merges, whose row blocks are alike. For
    whole-tensor methods it depends on ``row_blocks``, the share of the merge's bytes that
    they merge in row blocks: none, glibc's default (tensors merged whole, with their sorts,
    fragmented kept memory: the peak RSS grew by a quarter); at least half, the blocks larger
    than the tensors merged whole (``whole_tensor_bytes``: the largest, in the compute dtype)
    go back to the OS (:func:`return_row_blocks_to_the_os`); some (the largest tensors, as a 270M
    model's embedding and head), freed memory is kept too: the blocks are few and the whole
    tensors' temporaries stop costing a page fault per 4 KiB (270M exact TIES and DARE-TIES:
    0.4M to 1.8M page faults down to 0.11M to 0.15M, 2 to 5 s less system time, peak RSS within
    5%).
    """
    if policy == "low_memory":
        return_freed_tensors_to_the_os()
    elif policy == "fast" and (elementwise or 0 < row_blocks < 0.5):
        keep_freed_memory()
    elif policy == "fast" and row_blocks >= 0.5:
        return_row_blocks_to_the_os(whole_tensor_bytes)


def return_freed_tensors_to_the_os() -> bool:
    """Fixes glibc's mmap threshold at 1 MiB (Linux; a no-op elsewhere).

    glibc raises its threshold up to 32 MiB as large blocks are freed, after which
    tensors of a few MiB come from heap arenas that keep freed memory resident:
    streaming thousands of tensors through the reader and writer threads then
    holds more than the tensors in flight. The price is a page-fault and zeroing
    cost on every large allocation. The CLI's ``--low-memory`` calls this.
    """
    return _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def return_row_blocks_to_the_os(whole_tensor_bytes: int = 0) -> bool:
    """Fixes glibc's mmap threshold above the slices' temporaries and the tensors merged whole, and
    keeps the heap from being trimmed (Linux; a no-op elsewhere).

    A whole-tensor method merged in row blocks allocates blocks of several MiB (inputs, copies,
    results) among the slices' temporaries (mostly 4 MiB). Once glibc has raised its threshold
    to 32 MiB the blocks come from the heap and fragment it: a 4 GiB tensor's slerp held 1.65x
    the budget plus the baseline. Fixed between the two, the temporaries stay in the heap (no page
    faults) and the blocks go back at once (measured in-process on a 1 GiB tensor: slerp 749 to
    518 MB, model_stock 788 to 492 MB, TIES 548 to 473 MB, at some more time; the 4 GiB figures
    after it are in benchmarks/results/large_tensor_4gib_cpu.txt). Blocks smaller than the
    threshold (small budgets, many inputs) still come from the heap.

    The threshold also clears the tensors the merge takes whole (see :func:`row_block_mmap_threshold`),
    and the heap is not trimmed, since every tensor merged whole allocates its inputs and
    temporaries at its full size again: a 1.1B model's 16 MiB attention projections, each a fresh
    mapping under an 8 MiB threshold (and the heap's top given back between them), cost model_stock
    7.5M page faults and 33 s of system time; above them, 0.11M to 0.12M and 5 to 11 s, at a peak of 0.44
    to 0.53 GB instead of 0.47 to 0.50 GB (benchmarks/results/merge_bench_1b_fewer_passes_cpu.txt).
    Row blocks no larger than those tensors (there: 8 MiB per input) then stay in the heap too, so
    the policy is close to :func:`keep_freed_memory`: the exact trims' peaks rose by a tenth (TIES
    1,314 to 1,455 MB), for 10% to 30% less time. Where the tensors merged whole are smaller than
    8 MiB (the 4 GiB tensor's benchmark) the threshold stays at 8 MiB.
    """
    return (_mallopt(_M_MMAP_THRESHOLD, row_block_mmap_threshold(whole_tensor_bytes))
            and _mallopt(_M_TRIM_THRESHOLD, NO_TRIM))


def row_block_mmap_threshold(whole_tensor_bytes: int) -> int:
    """The smallest power of two above ``whole_tensor_bytes`` and the allocators' overhead, at least
    ROW_BLOCK_MMAP_THRESHOLD and at most glibc's ceiling: a tensor merged whole, and its temporaries
    of its size, then come from the heap (larger ones, such as stacked copies of it, are still mapped)."""
    wanted = 1 << (whole_tensor_bytes + ALLOCATION_OVERHEAD).bit_length()
    return min(MAX_MMAP_THRESHOLD, max(ROW_BLOCK_MMAP_THRESHOLD, wanted))


def keep_freed_memory() -> bool:
    """Makes glibc keep freed memory in the process for later allocations (Linux; a no-op elsewhere).

    By default an allocation over glibc's mmap threshold (at most 32 MiB) gets a fresh
    mapping that goes back to the OS when freed, so every such tensor starts with a
    page fault and a zeroing per 4 KiB page. With no mmap and no trimming, freed
    blocks stay in the heap and later tensors are carved from them, without page
    faults (tests/test_memory_settings.py counts them). The cost is memory: nothing
    freed goes back to the OS before the process ends, and blocks of mixed sizes
    fragment. It pays for element-wise merges, whose blocks are alike, and for merges whose
    largest tensors are row blocks; see :func:`apply_allocator`, and ``benchmarks/results/``
    for the figures.
    """
    return _mallopt(_M_MMAP_MAX, 0) and _mallopt(_M_TRIM_THRESHOLD, NO_TRIM)


def share_one_malloc_arena() -> bool:
    """Makes every thread allocate from one glibc heap arena (Linux; a no-op elsewhere).

    By default each thread that allocates gets an arena of its own, and what a
    thread frees stays resident in its arena for that thread alone: the reader
    frees input buffers the compute thread could have reused. With one arena,
    memory freed by any thread serves the next allocation: faster and smaller on the
    270M TIES merge (``benchmarks/results/``). Call it before the first threads start;
    the CLI does.
    """
    return _mallopt(_M_ARENA_MAX, 1)


def _mallopt(parameter: int, value: int) -> bool:
    function = libc.mallopt()
    if function is None:
        logger.debug("mallopt is not available; allocator settings unchanged")
        return False
    return bool(function(parameter, value))
