"""Gathering one model's embedding (or head) rows in the output's token order, a block of rows at a time.

The alignment says which of the model's rows each output row is; the rows are read
in few contiguous spans (a shuffled vocabulary still reads each byte about once),
and the rows a model lacks get their default, computed exactly as mergekit computes
it: the one row, or the running sum of the rows divided by their count, in the
compute dtype. Padding rows are the mean of the model's aligned token rows, taken
(as mergekit takes it) over the whole aligned tensor: a block with padding rows
holds that tensor once, beyond the memory budget.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import torch

from mergekit_like.vocab.alignment import Alignment, DefaultRow

# Reads rows (any order, repeats allowed) of one model's tensor, in the compute dtype.
RowReader = Callable[[str, Sequence[int]], torch.Tensor]
# Rows read in one span when the gap between two wanted rows is at most this, and the span
# stays within SPAN_OVERREAD times the rows it is read for: a shuffled vocabulary's block then
# reads at most twice its rows, in few reads, never most of the tensor.
MAX_GAP_ROWS = 32
SPAN_OVERREAD = 2


def spans(indices: Sequence[int], max_gap: int = MAX_GAP_ROWS) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` ranges covering ``indices``: neighbours joined across gaps of up to
    ``max_gap`` while a range holds no more than :data:`SPAN_OVERREAD` rows per row wanted."""
    out: list[tuple[int, int]] = []
    wanted: list[int] = []  # rows wanted in each range
    for index in sorted(set(indices)):
        if out and index - out[-1][1] <= max_gap and index + 1 - out[-1][0] <= SPAN_OVERREAD * (wanted[-1] + 1):
            out[-1] = (out[-1][0], index + 1)
            wanted[-1] += 1
        else:
            out.append((index, index + 1))
            wanted.append(1)
    return out


def gather_rows(read_span: Callable[[int, int], torch.Tensor], indices: Sequence[int]) -> torch.Tensor:
    """Rows ``indices`` of a tensor whose rows ``[start, stop)`` ``read_span`` gives."""
    pieces, offsets = [], {}
    base = 0
    for start, stop in spans(indices):
        pieces.append(read_span(start, stop))
        offsets[start] = base
        base += stop - start
    block = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    where = []
    starts = sorted(offsets)
    for index in indices:
        start = starts[bisect.bisect_right(starts, index) - 1]
        where.append(offsets[start] + index - start)
    if where == list(range(block.shape[0])):
        return block
    return block[torch.tensor(where, dtype=torch.long, device=block.device)]


class AlignedRows:
    """The aligned rows of every model of one tensor; defaults computed once and shared by the models."""

    def __init__(self, alignment: Alignment, read: RowReader, row_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.alignment = alignment
        self.read = read
        self.row_shape = row_shape
        self.dtype = dtype
        self.device = device
        self._defaults: dict[int, torch.Tensor] = {}

    def block(self, model: str, rows: tuple[int, int] | None) -> torch.Tensor:
        """``model``'s output rows ``[start, stop)`` (None: all of them)."""
        alignment = self.alignment
        start, stop = rows if rows is not None else (0, alignment.rows)
        out = torch.zeros((stop - start, *self.row_shape), dtype=self.dtype, device=self.device)
        token_stop = min(stop, len(alignment.tokens))
        source = alignment.sources[model]
        own = [r for r in range(start, token_stop) if source[r] >= 0 and r not in alignment.forced]
        if own:
            values = self.read(model, [source[r] for r in own])
            if len(own) == stop - start:
                return values
            out[torch.tensor([r - start for r in own], dtype=torch.long, device=self.device)] = values
        own_set = set(own)
        for row in range(start, token_stop):
            if row not in own_set and row in alignment.defaults:
                out[row - start] = self.default(row)
        if stop > len(alignment.tokens):
            tokens = out if start == 0 and token_stop == len(alignment.tokens) else None
            if tokens is None:
                tokens = self.block(model, (0, len(alignment.tokens)))
            else:
                tokens = tokens[:len(alignment.tokens)]
            out[max(start, len(alignment.tokens)) - start:] = torch.mean(tokens, dim=0)
        return out

    def default(self, row: int) -> torch.Tensor:
        if row not in self._defaults:
            self._defaults[row] = self._computed(self.alignment.defaults[row])
        return self._defaults[row]

    def _computed(self, default: DefaultRow) -> torch.Tensor:
        if not default.parts:
            return torch.zeros(self.row_shape, dtype=self.dtype, device=self.device)
        if len(default.parts) == 1:
            model, index = default.parts[0]
            return self.read(model, [index])[0]
        # mergekit's order of operations: a running sum from zeros, then one division.
        total = torch.zeros(self.row_shape, dtype=self.dtype, device=self.device)
        for model, index in default.parts:
            total = total + self.read(model, [index])[0]
        total /= len(default.parts)
        return total
