"""Open a checkpoint and read it tensor by tensor.

Tensor bytes are read with ``preadv`` into a fresh (or caller-supplied)
buffer rather than through a memory map: pages of a mapped file stay in the
process's resident set until it is unmapped, so mapping a 5 GB shard and
touching every tensor would grow RSS by 5 GB. Reading into buffers keeps the
resident memory at the tensors in flight, lets a GPU pipeline read straight
into pinned staging buffers, and reads the shards sequentially.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from mergekit_like.errors import (
    CheckpointNotFoundError,
    InvalidCheckpointError,
    UnsafeCheckpointError,
)
from mergekit_like.io.layout import CheckpointLayout, open_regular_file, resolve
from mergekit_like.io.readahead import advise, will_need
from mergekit_like.io.safetensors_format import SafetensorsHeader, TensorEntry, read_header

logger = logging.getLogger(__name__)

# Offset marking an entry whose bytes live in a pickle, not at a file position.
PICKLED = -1


class Checkpoint:
    """An opened checkpoint: every tensor's metadata up front, data on demand."""

    def __init__(
        self,
        layout: CheckpointLayout,
        entries: dict[str, TensorEntry],
        metadata: dict[str, str] | None = None,
        pickled: dict[Path, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.layout = layout
        self._entries = entries
        self.metadata = metadata or {}
        self._pickled = pickled or {}
        self._fds: dict[Path, int] = {}

    # -- metadata -----------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.layout.root if self.layout.index_path or len(self.layout.files) > 1 else self.layout.files[0]

    @property
    def files(self) -> tuple[Path, ...]:
        return self.layout.files

    def names(self) -> list[str]:
        """Tensor names in storage order (by shard, then byte offset)."""
        return list(self._entries)

    def entries(self) -> list[TensorEntry]:
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointNotFoundError(
                "tensor is not in this checkpoint", path=self.layout.source, tensor=name,
                fix="list its tensors with `mergekit-like inspect`",
            ) from None

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    @property
    def num_parameters(self) -> int:
        return sum(e.numel for e in self._entries.values())

    # -- data ---------------------------------------------------------------
    def read(
        self,
        name: str,
        *,
        device: torch.device | str | None = None,
        out: torch.Tensor | None = None,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Reads one tensor, or rows ``[start, stop)`` of its first dimension.

        ``out`` may be a uint8 CPU buffer (pinned, for instance) of at least the
        bytes read; the result then views it, so it must not be reused until the
        result is consumed.
        """
        entry = self.entry(name)
        start, stop = rows if rows is not None else (0, entry.shape[0] if entry.shape else 1)
        shape = (stop - start, *entry.shape[1:]) if rows is not None else entry.shape
        if entry.start == PICKLED:
            whole = self._pickled[entry.file][name].detach()
            part = whole[start:stop] if rows is not None else whole
            if out is None:
                tensor = part.clone().contiguous()
            else:
                nbytes = part.numel() * part.element_size()
                tensor = _out_buffer(out, nbytes).view(entry.dtype).reshape(part.shape).copy_(part)
        else:
            nbytes = entry.row_bytes * (stop - start) if rows is not None else entry.nbytes
            raw = self._read_range(entry, entry.start + start * entry.row_bytes, nbytes, out)
            tensor = raw.view(entry.dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=entry.dtype)
        if device is not None and torch.device(device).type != "cpu":
            tensor = tensor.to(device, non_blocking=tensor.is_pinned())
        return tensor

    def prefetch(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Asks the kernel to start reading a tensor (or rows of it) into the page cache.

        Returns at once; a later :meth:`read` finds the bytes in memory. A pipeline calls
        it for the item after the next, so the disk always has reads queued.
        """
        entry = self.entry(name)
        if entry.start == PICKLED:
            return
        start, stop = rows if rows is not None else (0, entry.shape[0] if entry.shape else 1)
        length = entry.row_bytes * (stop - start) if rows is not None else entry.nbytes
        if length:
            will_need(self._fd(entry.file), entry.start + start * entry.row_bytes, length)

    def _read_range(self, entry: TensorEntry, offset: int, nbytes: int, out: torch.Tensor | None) -> torch.Tensor:
        buffer = torch.empty(nbytes, dtype=torch.uint8) if out is None else _out_buffer(out, nbytes)
        view = memoryview(buffer.numpy())  # type: ignore[arg-type]
        fd = self._fd(entry.file)
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise InvalidCheckpointError(
                    f"file ended {offset + done - entry.start} bytes into the tensor's {entry.nbytes}",
                    path=entry.file, tensor=entry.name,
                    fix="the file was truncated after it was opened; download or save it again",
                )
            done += got
        return buffer

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = open_regular_file(path)  # it may have become a FIFO since its header was read
            advise(fd, 0, 0, "POSIX_FADV_SEQUENTIAL")  # reads go front to back: a larger kernel read-ahead
        return fd

    # -- lifetime -----------------------------------------------------------
    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._pickled.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, tensors={len(self)}, files={len(self.files)})"


def _out_buffer(out: torch.Tensor, nbytes: int) -> torch.Tensor:
    if out.dtype != torch.uint8 or out.device.type != "cpu" or out.numel() < nbytes:
        raise ValueError("out must be a CPU uint8 buffer at least as large as the bytes read")
    return out[:nbytes]


def open_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Opens the checkpoint at ``path`` and validates every header and the index.

    No tensor data is read. Raises a :mod:`mergekit_like.errors` error that names
    the file and tensor for any inconsistency.
    """
    layout = resolve(path, allow_pickle=allow_pickle)
    if layout.format == "pickle":
        return _open_pickle(layout)
    headers = {f: read_header(f) for f in layout.files}
    entries = _collect_entries(layout, headers)
    metadata = headers[layout.files[0]].metadata if len(layout.files) == 1 else {}
    return Checkpoint(layout, entries, metadata)


def _collect_entries(
    layout: CheckpointLayout, headers: dict[Path, SafetensorsHeader]
) -> dict[str, TensorEntry]:
    owner: dict[str, Path] = {}
    for file, header in headers.items():
        for name in header.tensors:
            if name in owner:
                raise InvalidCheckpointError(
                    f"tensor is stored in two shards, {owner[name].name} and {file.name}",
                    path=layout.source, tensor=name,
                    fix="the checkpoint is inconsistent; save it again",
                )
            owner[name] = file
    if layout.weight_map is None:
        chosen = owner
    else:
        chosen = {}
        for name, shard in layout.weight_map.items():
            if name not in headers[shard].tensors:
                raise InvalidCheckpointError(
                    f"index places the tensor in {shard.name}, which does not hold it",
                    path=layout.source, tensor=name,
                    fix="the index and shards disagree; regenerate the index or download again",
                )
            chosen[name] = shard
        unindexed = sorted(set(owner) - set(chosen))
        if unindexed:
            logger.warning(
                "%s: %d tensors are in shards but not in the index and are ignored (first: %s)",
                layout.source, len(unindexed), unindexed[0],
            )
    # Shards by their rank among the sorted shard paths, so the key holds no Path: comparing
    # Paths per tensor is slow enough to dominate opening a header of a million tensors.
    position = {file: i for i, file in enumerate(sorted(headers))}
    ordered = sorted(chosen.items(), key=lambda kv: (position[kv[1]], headers[kv[1]].tensors[kv[0]].start))
    return {name: headers[file].tensors[name] for name, file in ordered}


def _open_pickle(layout: CheckpointLayout) -> Checkpoint:
    pickled: dict[Path, dict[str, torch.Tensor]] = {}
    entries: dict[str, TensorEntry] = {}
    owner: dict[str, Path] = {}
    for file in layout.files:
        state = _load_pickle(file)
        pickled[file] = state
        for name, tensor in state.items():
            if name in owner:  # checked before the index filter, as for safetensors shards
                raise InvalidCheckpointError(
                    f"tensor is stored in two shards, {owner[name].name} and {file.name}",
                    path=layout.source, tensor=name, fix="the checkpoint is inconsistent; save it again",
                )
            owner[name] = file
            if layout.weight_map is not None and layout.weight_map.get(name) != file:
                continue
            nbytes = tensor.numel() * tensor.element_size()
            entries[name] = TensorEntry(name, tensor.dtype, tuple(tensor.shape), file, PICKLED, nbytes)
    if layout.weight_map is not None:
        missing = sorted(set(layout.weight_map) - set(entries))
        if missing:
            raise InvalidCheckpointError(
                f"index places the tensor in {layout.weight_map[missing[0]].name}, which does not hold it",
                path=layout.source, tensor=missing[0], fix="regenerate the index or download again",
            )
    return Checkpoint(layout, entries, pickled=pickled)


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            state: Any = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # legacy format
    except Exception as exc:
        raise UnsafeCheckpointError(
            f"torch.load(weights_only=True) refused or failed to read it ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})",
            path=file, fix="convert it to safetensors with the tool that made it",
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InvalidCheckpointError(
            f"holds a {type(state).__name__}, not a state dict", path=file,
            fix="save the model's state_dict(), or convert to safetensors",
        )
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if len(tensors) != len(state):
        logger.warning("%s: %d non-tensor entries ignored", file, len(state) - len(tensors))
    return tensors
