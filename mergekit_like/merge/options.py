"""How a merge runs, as opposed to what it computes: one object, passed in, never process-wide state.

Any options give the same bytes for the same recipe; they trade time, memory and
debuggability. The CLI builds one from its flags; library users pass their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mergekit_like.errors import OptionsError
from mergekit_like.io.sharding import DEFAULT_SHARD_SIZE

# The bytes of tensor data the pipeline holds at once: the block in compute, the next one read
# ahead, temporaries and results. Larger tensors go row block by row block (embeddings can be
# GBs) for element-wise methods and those declaring a tensor pass (TIES index/keep, DARE);
# the other whole-tensor methods hold each tensor whole whatever the budget. Larger blocks
# gain nothing once freed blocks are reused (see benchmarks/results for the figures behind
# this default).
DEFAULT_MEMORY_BUDGET = 256 * 1024 * 1024
MIN_MEMORY_BUDGET = 1024 * 1024

# What glibc does with freed tensor memory during the merge (see mergekit_like.memory):
# "as_is" leaves the process's settings alone (the library default: it is process-wide);
# "fast" keeps freed memory for later tensors where that pays (element-wise merges);
# "low_memory" returns freed tensors to the OS at once (lower peak RSS, slower).
Allocator = Literal["as_is", "fast", "low_memory"]


@dataclass(frozen=True)
class MergeOptions:
    """Settings of one merge run; see each field for what it trades."""

    device: str = "cpu"  # cpu, cuda, cuda:N or auto
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # bytes in flight: row blocks and read-ahead
    max_shard_size: int = DEFAULT_SHARD_SIZE
    # Overlap reading, computing and writing; off: one item at a time in the calling thread
    # (slower, the same bytes, and a plain stack trace when debugging).
    pipeline: bool = True
    allocator: Allocator = "as_is"
    # Refuse inputs and outputs holding NaN or Inf (outputs are always counted, and warned about;
    # the inputs' check is off by default: it costs a pass over every input tensor).
    check_finite: bool = False
    allow_pickle: bool = False  # read pytorch_model*.bin pickles (they can run code)
    # Merge models whose config.json names different architectures (mergekit's --allow-crimes).
    allow_crimes: bool = False
    copy_tokenizer: bool = True  # the tokenizer files of the model the output follows go beside it
    # Threads for per-model work inside a kernel (TIES' masks); None: torch's thread count.
    kernel_threads: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.memory_budget < MIN_MEMORY_BUDGET:
            problems.append(f"memory budget {self.memory_budget:,} bytes is below the minimum of "
                            f"{MIN_MEMORY_BUDGET:,}")
        if self.max_shard_size < 1:
            problems.append(f"the largest shard must hold at least one byte, not {self.max_shard_size}")
        if self.allocator not in ("as_is", "fast", "low_memory"):
            problems.append(f"allocator {self.allocator!r} is not one of as_is, fast, low_memory")
        if self.kernel_threads is not None and self.kernel_threads < 1:
            problems.append(f"kernel_threads must be at least 1, not {self.kernel_threads}")
        if problems:
            raise OptionsError(problems)
