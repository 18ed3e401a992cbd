"""Averages of FSDP/DTensor-sharded models: one sidecar per rank, then consolidation.

Each rank averages its local shard into ``OUT/shards/rank_NNNNN/<average>/``;
rank 0 writes ``OUT/shards/manifest.json`` with every tensor's global shape,
dtype and placement. :func:`consolidate` (``mergekit-like consolidate OUT
--average ema_0.999 -o CKPT``) joins the shards into one ready-to-load
checkpoint, one tensor at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mergekit_like.errors import CheckpointNotFoundError, InvalidCheckpointError
from mergekit_like.io.dtypes import dtype_name
from mergekit_like.io.outputs import WriteItem, write_checkpoints
from mergekit_like.io.reader import Checkpoint, open_checkpoint
from mergekit_like.io.sharding import DEFAULT_SHARD_SIZE, TensorSpec
from mergekit_like.io.writer import WrittenCheckpoint

SHARDS = "shards"
MANIFEST = "manifest.json"


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def is_sharded(model: torch.nn.Module) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in model.state_dict(keep_vars=True).values())


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own shard of a DTensor; any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def shard_directory(out_dir: Path, rank: int) -> Path:
    return out_dir / SHARDS / f"rank_{rank:05d}"


def _placement(tensor: torch.Tensor) -> dict[str, Any]:
    placements = getattr(tensor, "placements", None)
    if not placements:
        return {"kind": "replicate"}
    if len(placements) != 1:
        raise InvalidCheckpointError("only one-dimensional device meshes are supported for sharded averages")
    placement = placements[0]
    dim = getattr(placement, "dim", None)
    return {"kind": "shard", "dim": int(dim)} if dim is not None else {"kind": "replicate"}


def write_manifest(out_dir: Path, model: torch.nn.Module, config: dict[str, Any] | None) -> None:
    distributed = torch.distributed
    world = distributed.get_world_size() if distributed.is_initialized() else 1
    tensors = {
        name: {"shape": list(t.shape), "dtype": dtype_name(t.dtype), **_placement(t)}
        for name, t in model.state_dict(keep_vars=True).items()
    }
    manifest = {"world_size": world, "tensors": tensors, "config": config}
    path = out_dir / SHARDS / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1) + "\n")


def consolidate(
    out_dir: str | Path, average: str, output: str | Path, *, step: int | None = None,
    overwrite: bool = False, max_shard_size: int = DEFAULT_SHARD_SIZE,
) -> WrittenCheckpoint:
    """Joins every rank's shard of ``average`` (``latest``, or ``step_N``) into one checkpoint."""
    root = Path(out_dir) / SHARDS
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointNotFoundError("has no shards/manifest.json", path=out_dir,
                                      fix="point at the out_dir of a sharded (FSDP) run")
    manifest = json.loads(manifest_path.read_text())
    world = manifest["world_size"]
    which = f"step_{step}" if step is not None else "latest"
    parts = [shard_directory(Path(out_dir), r) / average / which for r in range(world)]
    missing = [p for p in parts if not p.exists()]
    if missing:
        raise CheckpointNotFoundError("is missing: every rank must have written this average", path=missing[0],
                                      fix="consolidate a step that every rank saved")
    tensors = manifest["tensors"]
    specs = [TensorSpec(n, _dtype(t["dtype"]), tuple(t["shape"])) for n, t in tensors.items()]
    checkpoints = [open_checkpoint(p) for p in parts]
    try:
        def joined() -> Iterator[WriteItem]:
            for spec in specs:
                yield WriteItem(0, spec.name, _join(checkpoints, spec, tensors[spec.name]))

        def add_config(directory: Path, _index: int) -> None:
            if manifest.get("config") is not None:
                (directory / "config.json").write_text(json.dumps(manifest["config"], indent=2) + "\n")

        (written,) = write_checkpoints(output, [None], specs, joined(), overwrite=overwrite,
                                       max_shard_size=max_shard_size, finalize=add_config)
    finally:
        for checkpoint in checkpoints:
            checkpoint.close()
    return written


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidCheckpointError(f"manifest names an unknown dtype {name!r}")
    return dtype


def _join(checkpoints: list[Checkpoint], spec: TensorSpec, placement: dict[str, Any]) -> torch.Tensor:
    if placement["kind"] == "replicate":
        return checkpoints[0].read(spec.name).to(spec.dtype)
    pieces = [c.read(spec.name) for c in checkpoints if spec.name in c and c.entry(spec.name).numel]
    joined = torch.cat(pieces, dim=placement["dim"]) if pieces else torch.empty(spec.shape)
    if tuple(joined.shape) != spec.shape:
        raise InvalidCheckpointError(f"shards join to {list(joined.shape)}, not {list(spec.shape)}",
                                     tensor=spec.name, fix="the shards come from different runs or steps")
    return joined.to(spec.dtype)
