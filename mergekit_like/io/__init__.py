"""Checkpoint I/O: find, validate and read checkpoints; write sharded safetensors atomically."""

from mergekit_like.io.atomic import atomic_directory, check_target
from mergekit_like.io.convert import convert_checkpoint
from mergekit_like.io.layout import CheckpointLayout, resolve
from mergekit_like.io.reader import Checkpoint, open_checkpoint
from mergekit_like.io.safetensors_format import TensorEntry, read_header
from mergekit_like.io.sharding import DEFAULT_SHARD_SIZE, TensorSpec, parse_size, plan_shards
from mergekit_like.io.sidefiles import copy_side_files
from mergekit_like.io.summary import CheckpointSummary, summarize
from mergekit_like.io.writer import ShardedWriter, WrittenCheckpoint

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "Checkpoint",
    "CheckpointLayout",
    "CheckpointSummary",
    "ShardedWriter",
    "TensorEntry",
    "TensorSpec",
    "WrittenCheckpoint",
    "atomic_directory",
    "check_target",
    "convert_checkpoint",
    "copy_side_files",
    "open_checkpoint",
    "parse_size",
    "plan_shards",
    "read_header",
    "resolve",
    "summarize",
]
