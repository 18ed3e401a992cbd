"""The tensor pass of a method whose output rows, under some parameters, depend on the same rows of its inputs only.

Such a tensor merges in row blocks with nothing to learn first (no pass over it): each block
is merged as a tensor of its own (of at least two rows: see the planner's TENSOR_PASS_MIN_ROWS).
The kernel gets None under the keyword. On the CPU only: a CUDA reduction along each row splits
the rows' entries according to how many rows it reduces at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch


def flat_span(rows: tuple[int, int], block: torch.Tensor) -> tuple[int, int]:
    """The flat entries of the whole tensor that ``block``, its rows ``rows``, holds."""
    per_row = block.numel() // max(1, rows[1] - rows[0])
    return rows[0] * per_row, rows[1] * per_row


class RowOrder:
    """The row blocks of a tensor asked for in row order, once each: a reduction whose blocks continue
    one another (ties counted, a random stream drawn) refuses any other order."""

    def __init__(self) -> None:
        self.next_row = 0

    def take(self, rows: tuple[int, int]) -> None:
        if rows[0] != self.next_row:
            raise RuntimeError(f"row block {rows} asked for out of order (expected one from row {self.next_row})")
        self.next_row = rows[1]


class _NothingToReduce:
    def observe(self, pass_index: int, models: Sequence[torch.Tensor], base: torch.Tensor | None) -> None:
        raise RuntimeError("a method whose rows merge on their own has no pass over a tensor")

    def end_pass(self, pass_index: int) -> None:
        pass

    def block(self, rows: tuple[int, int]) -> None:
        return None


@dataclass(frozen=True)
class IndependentRows:
    """Rows along dim 0 merge on their own wherever ``applies(params)`` holds (kernel names)."""

    keyword: str
    applies: Callable[[Mapping[str, Any]], bool]

    def blockwise(self, params: Mapping[str, Any], compute_dtype: torch.dtype, device_type: str) -> bool:
        # A CUDA reduction along a row splits it according to how many rows it reduces at once.
        return device_type == "cpu" and self.applies(params)

    def passes(self, params: Mapping[str, Any], compute_dtype: torch.dtype) -> int:
        return 0

    def start(self, params: Mapping[str, Any], numel: int, device: torch.device, executor: Executor | None,
              generator: torch.Generator | None = None) -> _NothingToReduce:
        return _NothingToReduce()
