"""Averages of FSDP/DTensor-sharded models: one sidecar per rank, then consolidation.

Each rank averages its local shard into ``OUT/shards/rank_NNNNN/<average>/``;
rank 0 writes ``OUT/shards/manifest.json`` with every tensor's global shape,
dtype and placement. :func:`consolidate` (``mergekit-like consolidate OUT
--average ema_0.999 -o CKPT``) joins the shards into one ready-to-load
checkpoint, one tensor at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import torch

from mergekit_like.errors import CheckpointNotFoundError, InvalidCheckpointError
from mergekit_like.io.dtypes import dtype_name
from mergekit_like.io.outputs import OutputSpec, WriteItem, write_checkpoints
from mergekit_like.io.reader import Checkpoint, open_checkpoint
from mergekit_like.io.sharding import DEFAULT_SHARD_SIZE, TensorSpec
from mergekit_like.io.sidefiles import config_with_dtype
from mergekit_like.io.writer import WrittenCheckpoint

SHARDS = "shards"
MANIFEST = "manifest.json"
# More ranks than any training run has: a manifest claiming more is corrupt, not large.
MAX_WORLD_SIZE = 1 << 20
MANIFEST_FIX = "rank 0 of the training run writes it; restore it from that run, or rerun the run"


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def is_sharded(model: torch.nn.Module) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in model.state_dict(keep_vars=True).values())


def written_dtype(dtype: torch.dtype, out_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype an average's tensor is written in: ``out_dtype`` for floating tensors when given, else its own."""
    return out_dtype if out_dtype is not None and dtype.is_floating_point else dtype


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


def write_manifest(out_dir: Path, model: torch.nn.Module, config: dict[str, Any] | None,
                   out_dtype: torch.dtype | None = None) -> None:
    """Rank 0's record of the sharded model; floating tensors (and the config) in ``out_dtype`` when given,
    the dtype every rank's sidecar writes its shards in."""
    distributed = torch.distributed
    world = distributed.get_world_size() if distributed.is_initialized() else 1
    tensors = {
        name: {"shape": list(t.shape), "dtype": dtype_name(written_dtype(t.dtype, out_dtype)), **_placement(t)}
        for name, t in model.state_dict(keep_vars=True).items()
    }
    manifest = {"world_size": world, "tensors": tensors, "config": config_with_dtype(config, out_dtype)}
    path = out_dir / SHARDS / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1) + "\n")


@dataclass(frozen=True)
class Manifest:
    """What rank 0 recorded of a sharded model: how many ranks, every tensor's whole shape, and its config."""

    world_size: int
    tensors: dict[str, TensorPlacement]
    config: dict[str, Any] | None


@dataclass(frozen=True)
class TensorPlacement:
    dtype: torch.dtype
    shape: tuple[int, ...]
    dim: int | None  # the dimension split across ranks; None: every rank holds it whole


def read_manifest(path: Path) -> Manifest:
    """Reads and checks ``shards/manifest.json``; anything malformed is an :class:`InvalidCheckpointError`."""

    def invalid(what: str, tensor: str | None = None) -> InvalidCheckpointError:
        return InvalidCheckpointError(what, path=path, tensor=tensor, fix=MANIFEST_FIX)

    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):
        # ValueError: bad JSON, bad UTF-8, integers past Python's digit limit; RecursionError: json
        # nests one Python frame per bracket, so a corrupt '[[[[...' exhausts the stack.
        raise invalid("is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise invalid("is not a JSON object")
    missing = [key for key in ("world_size", "tensors", "config") if key not in manifest]
    if missing:
        raise invalid(f"has no {', '.join(repr(k) for k in missing)}")
    world = manifest["world_size"]
    if not _is_int(world) or not 1 <= world <= MAX_WORLD_SIZE:
        raise invalid(f"world_size {_shown(world)} is not a number of ranks (1 to {MAX_WORLD_SIZE})")
    if not isinstance(manifest["tensors"], dict):
        raise invalid("'tensors' is not an object of tensor name -> placement")
    config = manifest["config"]
    if config is not None and not isinstance(config, dict):
        raise invalid("'config' is neither an object nor null")
    tensors = {}
    for name, entry in manifest["tensors"].items():
        try:
            tensors[name] = _parsed_placement(entry)
        except ValueError as exc:
            raise invalid(str(exc), tensor=name) from None
    return Manifest(world, tensors, config)


def _parsed_placement(entry: Any) -> TensorPlacement:
    """One tensor's entry of the manifest; ValueError saying what is wrong with it."""
    if not isinstance(entry, dict):
        raise ValueError("has no placement object")
    shape, dtype, kind, dim = entry.get("shape"), entry.get("dtype"), entry.get("kind"), entry.get("dim")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise ValueError(f"shape {_shown(shape)} is not a list of sizes")
    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"dtype {_shown(dtype)} names no torch dtype")
    if kind == "replicate":
        return TensorPlacement(torch_dtype, tuple(shape), None)
    if kind != "shard":
        raise ValueError(f"kind {_shown(kind)} is neither 'shard' nor 'replicate'")
    if not _is_int(dim) or not 0 <= dim < len(shape):
        raise ValueError(f"shard dim {_shown(dim)} is not a dimension of shape {shape}")
    return TensorPlacement(torch_dtype, tuple(shape), dim)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A manifest value for a message, cut short (a corrupt file may hold anything)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def consolidate(
    out_dir: str | Path, average: str, output: str | Path, *, step: int | None = None,
    overwrite: bool = False, max_shard_size: int = DEFAULT_SHARD_SIZE, check_finite: bool = False,
) -> WrittenCheckpoint:
    """Joins every rank's shard of ``average`` (``latest``, or ``step_N``) into one checkpoint.

    ``check_finite`` refuses an output holding NaN or infinite values (they are counted otherwise).
    """
    manifest_path = Path(out_dir) / SHARDS / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointNotFoundError("has no shards/manifest.json", path=out_dir,
                                      fix="point at the out_dir of a sharded (FSDP) run")
    manifest = read_manifest(manifest_path)
    which = f"step_{step}" if step is not None else "latest"
    parts = [shard_directory(Path(out_dir), r) / average / which for r in range(manifest.world_size)]
    missing = next((p for p in parts if not p.exists()), None)
    if missing is not None:
        raise CheckpointNotFoundError("is missing: every rank must have written this average", path=missing,
                                      fix="consolidate a step that every rank saved")
    if step is None and len(parts) > 1:
        parts = _one_step(Path(out_dir), parts)
    specs = [TensorSpec(n, t.dtype, t.shape) for n, t in manifest.tensors.items()]
    with ExitStack() as stack:
        checkpoints = [stack.enter_context(open_checkpoint(p)) for p in parts]

        def joined() -> Iterator[WriteItem]:
            for spec in specs:
                yield WriteItem(0, spec.name, _join(checkpoints, spec, manifest.tensors[spec.name]))

        # Every rank's shards are inputs: the output may not replace the run that holds them.
        (written,) = write_checkpoints(output, [OutputSpec(config=manifest.config)], specs, joined(),
                                       overwrite=overwrite, max_shard_size=max_shard_size,
                                       inputs={f"{average} shards": Path(out_dir) / SHARDS},
                                       refuse_nonfinite=check_finite)
    return written


def _one_step(out_dir: Path, latest: list[Path]) -> list[Path]:
    """The ``step_N`` directories every rank's ``latest`` names, which must be one step; else an
    :class:`InvalidCheckpointError`. Read once: a live run that moves ``latest`` meanwhile changes nothing.

    Shards of different steps join into a checkpoint of the right shapes that no step of the run held.
    """
    steps = [os.readlink(p) if p.is_symlink() else None for p in latest]
    unknown = next((p for p, s in zip(latest, steps) if s is None), None)
    if unknown is not None:
        raise InvalidCheckpointError("is no link to a step_N directory, so its step is unknown", path=unknown,
                                     fix="pass --step N, a step every rank saved")
    if len(set(steps)) > 1:
        seen = ", ".join(f"rank {rank} {name}" for rank, name in enumerate(steps))
        raise InvalidCheckpointError(f"the ranks' latest shards are of different steps ({seen})", path=out_dir,
                                     fix="pass --step N, a step every rank saved")
    return [p.parent / str(s) for p, s in zip(latest, steps)]


def _join(checkpoints: list[Checkpoint], spec: TensorSpec, placement: TensorPlacement) -> torch.Tensor:
    if placement.dim is None:
        return checkpoints[0].read(spec.name).to(spec.dtype)
    pieces = [c.read(spec.name) for c in checkpoints if spec.name in c and c.entry(spec.name).numel]
    joined = torch.cat(pieces, dim=placement.dim) if pieces else torch.empty(spec.shape)
    if tuple(joined.shape) != spec.shape:
        raise InvalidCheckpointError(f"shards join to {list(joined.shape)}, not {list(spec.shape)}",
                                     tensor=spec.name, fix="the shards come from different runs or steps")
    return joined.to(spec.dtype)
