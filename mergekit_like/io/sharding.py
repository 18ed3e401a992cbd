"""Deciding which output tensor goes into which shard, before any data exists."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergekit_like.io.dtypes import itemsize

DEFAULT_SHARD_SIZE = 5_000_000_000  # huggingface_hub's default, in decimal units

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor's name, dtype and shape, known before its data is computed."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ShardPlan:
    """One output file and the tensors it holds, in data order."""

    filename: str
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def parse_size(text: str | int) -> int:
    """Reads ``"5GB"`` (decimal, as huggingface_hub), ``"2GiB"`` (binary) or a byte count."""
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"size must be positive, got {text}")
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"cannot read size {text!r}; write it like 5GB, 500MB or 2GiB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def plan_shards(
    specs: Sequence[TensorSpec], max_shard_size: int = DEFAULT_SHARD_SIZE, prefix: str = "model"
) -> list[ShardPlan]:
    """Fills shards in order up to ``max_shard_size`` bytes each.

    A tensor larger than the limit gets a shard of its own, as transformers does.
    One shard is named ``{prefix}.safetensors``; several are
    ``{prefix}-00001-of-0000N.safetensors``.
    """
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    if len(groups) == 1:
        return [ShardPlan(f"{prefix}.safetensors", tuple(groups[0]))]
    n = len(groups)
    return [
        ShardPlan(f"{prefix}-{i:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups, 1)
    ]
