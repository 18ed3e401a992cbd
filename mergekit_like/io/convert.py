"""Copy a checkpoint through the streaming reader and writer: reshard, recast, de-pickle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from mergekit_like.io.outputs import OutputSpec, WriteItem, write_checkpoints
from mergekit_like.io.reader import open_checkpoint
from mergekit_like.io.sharding import DEFAULT_SHARD_SIZE, TensorSpec
from mergekit_like.io.writer import WrittenCheckpoint
from mergekit_like.progress import NullProgress, ProgressSink


def cast_dtype(dtype: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    """The output dtype of a tensor: floats take ``target``, integers and bools keep theirs."""
    return target if target is not None and dtype.is_floating_point else dtype


def convert_checkpoint(
    source: str | Path,
    output: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: ProgressSink | None = None,
    check_finite: bool = False,
) -> WrittenCheckpoint:
    """Writes ``source`` to ``output`` as sharded safetensors, one tensor in memory at a time.

    Floating tensors are cast to ``dtype`` when given. Side files (config,
    tokenizer) are copied. The output appears atomically. NaN and infinite values written (a cast
    to float16 of values beyond its range) are counted in the result, or refused with ``check_finite``.
    """
    sink = progress or NullProgress()
    with open_checkpoint(source, allow_pickle=allow_pickle) as checkpoint:
        specs = [TensorSpec(e.name, cast_dtype(e.dtype, dtype), e.shape) for e in checkpoint.entries()]
        sink.start(len(specs), checkpoint.total_bytes)

        def copied() -> Iterator[WriteItem]:
            for spec in specs:
                yield WriteItem(0, spec.name, checkpoint.read(spec.name).to(spec.dtype))
                sink.advance(spec.name, spec.nbytes)

        (written,) = write_checkpoints(
            output, [OutputSpec()], specs, copied(), overwrite=overwrite, max_shard_size=max_shard_size,
            side_files_from=checkpoint.layout.root, out_dtype=dtype, inputs={str(source): checkpoint.layout.root},
            refuse_nonfinite=check_finite,
        )
    return written
