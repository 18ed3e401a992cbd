"""What `inspect` reports about a checkpoint, as plain data."""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import Any

from mergekit_like.io.dtypes import dtype_name
from mergekit_like.io.reader import Checkpoint


@dataclass(frozen=True, slots=True)  # slots: a checkpoint may have a million rows
class TensorRow:
    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    nbytes: int
    shard: str


@dataclass(frozen=True)
class CheckpointSummary:
    path: str
    format: str
    index: str | None
    shards: tuple[str, ...]
    tensors: tuple[TensorRow, ...]
    metadata: dict[str, str]

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def dtype_counts(self) -> dict[str, int]:
        """Parameters per dtype."""
        counts: Counter[str] = Counter()
        for t in self.tensors:
            counts[t.dtype] += t.numel
        return dict(counts.most_common())

    @property
    def largest(self) -> TensorRow | None:
        return max(self.tensors, key=lambda t: t.nbytes, default=None)

    def to_dict(self) -> dict[str, Any]:
        largest = self.largest
        return {
            "path": self.path,
            "format": self.format,
            "index": self.index,
            "shards": list(self.shards),
            "num_tensors": len(self.tensors),
            "num_parameters": self.num_parameters,
            "total_bytes": self.total_bytes,
            "parameters_by_dtype": self.dtype_counts,
            "largest_tensor": largest.name if largest else None,
            "metadata": self.metadata,
            "tensors": [
                {
                    "name": t.name, "shape": list(t.shape), "dtype": t.dtype,
                    "numel": t.numel, "bytes": t.nbytes, "shard": t.shard,
                }
                for t in self.tensors
            ],
        }


def summarize(checkpoint: Checkpoint) -> CheckpointSummary:
    """Collects the per-tensor table and totals of an opened checkpoint (no data is read)."""
    layout = checkpoint.layout
    name_of = functools.cache(dtype_name)  # per dtype, not per tensor
    rows = tuple(
        TensorRow(e.name, e.shape, name_of(e.dtype), e.numel, e.nbytes, e.file.name)
        for e in checkpoint.entries()
    )
    return CheckpointSummary(
        path=str(checkpoint.path),
        format=layout.format,
        index=layout.index_path.name if layout.index_path else None,
        shards=tuple(f.name for f in layout.files),
        tensors=rows,
        metadata=dict(checkpoint.metadata),
    )
