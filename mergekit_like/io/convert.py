"""Copy a checkpoint through the streaming reader and writer: reshard, recast, de-pickle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from mergekit_like.io.atomic import atomic_directory, check_target
from mergekit_like.io.reader import open_checkpoint
from mergekit_like.io.sharding import DEFAULT_SHARD_SIZE, TensorSpec
from mergekit_like.io.sidefiles import copy_side_files
from mergekit_like.io.writer import ShardedWriter, WrittenCheckpoint
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
) -> WrittenCheckpoint:
    """Writes ``source`` to ``output`` as sharded safetensors, one tensor in memory at a time.

    Floating tensors are cast to ``dtype`` when given. Side files (config,
    tokenizer) are copied. The output appears atomically.
    """
    progress = progress or NullProgress()
    check_target(output, overwrite=overwrite)
    with open_checkpoint(source, allow_pickle=allow_pickle) as checkpoint:
        specs = [TensorSpec(e.name, cast_dtype(e.dtype, dtype), e.shape) for e in checkpoint.entries()]
        progress.start(len(specs), checkpoint.total_bytes)
        with atomic_directory(output, overwrite=overwrite) as temp:
            with ShardedWriter(temp, specs, max_shard_size=max_shard_size) as writer:
                for spec in specs:
                    writer.write(spec.name, checkpoint.read(spec.name).to(spec.dtype))
                    progress.advance(spec.name, spec.nbytes)
            copy_side_files(checkpoint.layout.root, temp, dtype)
    assert writer.result is not None
    return replace(writer.result, directory=Path(output))
