"""A streaming, sharded safetensors writer.

Every output tensor's name, dtype and shape is known before its data is
computed, so each shard's header (and so every tensor's byte offset) is fixed
up front. Tensors are then written with ``pwrite`` at their offsets as they
are produced, in any order, and no shard is ever held in memory. Space for a
shard is reserved when it is opened, so a full disk is found before hours of
compute rather than at the end.

Two things keep the end of a write short. Each shard's sha256 (for the
checksum manifest) is computed from the bytes as they are written, when they
arrive in file order as a streaming merge writes them, so the shard is not
read back. And the kernel is asked to start writing each tensor's pages to
disk at once, so the final fsync finds little left to flush.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol

import torch

from mergekit_like.errors import OutputWriteError, TensorWriteError, os_error_words
from mergekit_like.io import libc
from mergekit_like.io.safetensors_format import build_header
from mergekit_like.io.sharding import DEFAULT_SHARD_SIZE, ShardPlan, TensorSpec, plan_shards
from mergekit_like.io.values import nonfinite_count

INDEX_SUFFIX = ".safetensors.index.json"
DEFAULT_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class WrittenCheckpoint:
    """What the writer produced."""

    directory: Path
    shards: tuple[str, ...]
    index: str | None
    total_bytes: int
    num_tensors: int
    # sha256 of each shard whose bytes were written in file order (the others are hashed later).
    digests: dict[str, str] = field(default_factory=dict)
    # Tensor name -> how many NaN or infinite values were written in it (only those holding any).
    nonfinite: dict[str, int] = field(default_factory=dict)

    def nonfinite_note(self) -> str | None:
        """One line naming the tensors written with NaN or infinite values, or None when there are none."""
        if not self.nonfinite:
            return None
        worst = sorted(self.nonfinite.items(), key=lambda item: -item[1])
        named = ", ".join(f"'{name}' ({count:,})" for name, count in worst[:3])
        more = f" and {len(worst) - 3} more" if len(worst) > 3 else ""
        total = sum(self.nonfinite.values())
        return (f"{self.directory}: {total:,} NaN or infinite values written in {len(worst)} tensor(s): {named}{more}; "
                "an overflow in a 16-bit dtype (write float32), or NaN in an input; --check-finite refuses such "
                "an output")


@dataclass
class _Slot:
    shard: int
    offset: int
    spec: TensorSpec
    written: bool = False
    bytes_written: int = 0


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``tensor`` (moved to the CPU, made contiguous)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")  # type: ignore[arg-type]


class _Hasher(Protocol):
    """What the digest needs of hashlib's objects (whose class is private)."""

    def update(self, data: memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


class _StreamDigest:
    """sha256 of a file fed by its writes, valid while they arrive front to back without gaps."""

    def __init__(self) -> None:
        self._hash: _Hasher | None = hashlib.sha256()
        self.position = 0

    def update(self, data: memoryview, offset: int) -> None:
        if self._hash is None or not len(data):
            return
        if offset != self.position:
            self._hash = None  # out of order: the file is hashed from disk instead
            return
        self._hash.update(data)  # releases the GIL for large buffers
        self.position += len(data)

    def hexdigest(self, file_size: int) -> str | None:
        return self._hash.hexdigest() if self._hash is not None and self.position == file_size else None


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Writes all of ``data`` at ``offset``, looping over short writes."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class ShardedWriter:
    """Writes the planned tensors into ``directory`` as safetensors shards plus index.

    Use as a context manager, or call :meth:`close` (success) or :meth:`abort`.
    """

    def __init__(
        self,
        directory: str | Path,
        specs: Sequence[TensorSpec],
        *,
        max_shard_size: int = DEFAULT_SHARD_SIZE,
        prefix: str = "model",
        metadata: dict[str, str] | None = None,
        refuse_nonfinite: bool = False,
    ) -> None:
        """``refuse_nonfinite``: a tensor holding NaN or infinite values fails the write (otherwise
        they are counted, in :attr:`WrittenCheckpoint.nonfinite`)."""
        self.directory = Path(directory)
        self.refuse_nonfinite = refuse_nonfinite
        self._nonfinite: dict[str, int] = {}
        self.prefix = prefix
        self.metadata = dict(DEFAULT_METADATA if metadata is None else metadata)
        self.plans: list[ShardPlan] = plan_shards(specs, max_shard_size, prefix)
        self._slots: dict[str, _Slot] = {}
        self._headers: list[bytes] = []
        self._remaining: list[int] = []
        for index, plan in enumerate(self.plans):
            header, offsets = build_header([(t.name, t.dtype, t.shape) for t in plan.tensors], self.metadata)
            self._headers.append(header)
            self._remaining.append(len(plan.tensors))
            for spec, offset in zip(plan.tensors, offsets):
                if spec.name in self._slots:
                    raise TensorWriteError("planned twice for the output", tensor=spec.name)
                self._slots[spec.name] = _Slot(index, offset, spec)
        self._fds: dict[int, int] = {}
        self._digests = [_StreamDigest() for _ in self.plans]
        self._finished = False
        self.result: WrittenCheckpoint | None = None

    @property
    def specs(self) -> list[TensorSpec]:
        return [slot.spec for slot in self._slots.values()]

    def write(self, name: str, tensor: torch.Tensor, *, row_start: int | None = None) -> None:
        """Writes the planned tensor ``name``, or (``row_start``) rows of it starting there.

        dtype and shape must match the plan (for rows: all but the first
        dimension). A tensor written in parts is complete once every byte is.
        """
        slot = self._slot_for(name, tensor, row_start)
        self._count_nonfinite(name, tensor)
        fd = self._open_shard(slot.shard)
        path = self.directory / self.plans[slot.shard].filename
        data = tensor_bytes(tensor)
        offset = 0 if row_start is None else row_start * (slot.spec.nbytes // slot.spec.shape[0])
        with _as_write_error(path, name):
            pwrite_all(fd, data, slot.offset + offset)
        self._digests[slot.shard].update(data, slot.offset + offset)
        start_writeback(fd, slot.offset + offset, len(data))
        slot.bytes_written += len(data)
        if slot.bytes_written < slot.spec.nbytes:
            return
        slot.written = True
        self._remaining[slot.shard] -= 1
        if self._remaining[slot.shard] == 0:
            self._finish_shard(slot.shard)

    def _count_nonfinite(self, name: str, tensor: torch.Tensor) -> None:
        # One pass over the tensor, on the writer's thread: it overlaps the next tensor's compute.
        bad = nonfinite_count(tensor)
        if not bad:
            return
        if self.refuse_nonfinite:
            raise TensorWriteError(f"holds {bad:,} NaN or infinite values (--check-finite refuses them); an "
                                   "overflow in a 16-bit dtype (write float32), or NaN in an input", tensor=name)
        self._nonfinite[name] = self._nonfinite.get(name, 0) + bad

    def _slot_for(self, name: str, tensor: torch.Tensor, row_start: int | None) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            raise TensorWriteError("is not in the output plan", tensor=name, fix="plan every tensor up front")
        if slot.written:
            raise TensorWriteError("was already written", tensor=name)
        spec = slot.spec
        if row_start is None:
            fits = tuple(tensor.shape) == spec.shape
        else:
            fits = (bool(spec.shape) and tuple(tensor.shape[1:]) == spec.shape[1:]
                    and 0 <= row_start and row_start + tensor.shape[0] <= spec.shape[0])
        if tensor.dtype != spec.dtype or not fits:
            where = "" if row_start is None else f" at row {row_start}"
            raise TensorWriteError(
                f"got {tensor.dtype} {tuple(tensor.shape)}{where} but the plan says {spec.dtype} {spec.shape}",
                tensor=name,
            )
        return slot

    def _open_shard(self, index: int) -> int:
        fd = self._fds.get(index)
        if fd is not None:
            return fd
        path = self.directory / self.plans[index].filename
        header = self._headers[index]
        size = len(header) + self.plans[index].nbytes
        with _as_write_error(path, None):
            opened = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[index] = opened
            _reserve(opened, size)
            pwrite_all(opened, memoryview(header), 0)
        self._digests[index].update(memoryview(header), 0)
        return opened

    def _finish_shard(self, index: int) -> None:
        fd = self._fds.pop(index, None)
        path = self.directory / self.plans[index].filename
        if fd is None:  # a shard of only empty tensors is never opened by write()
            fd = self._open_shard(index)
            self._fds.pop(index)
        with _as_write_error(path, None):
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> WrittenCheckpoint:
        """Checks every planned tensor was written, finishes the shards and writes the index."""
        if self._finished:
            raise RuntimeError("writer already closed")
        missing = [n for n, s in self._slots.items() if not s.written]
        if missing:
            self.abort()
            raise TensorWriteError(
                f"was planned but never written ({len(missing)} tensors missing)", tensor=missing[0]
            )
        for index in range(len(self.plans)):
            if not self.plans[index].tensors:
                self._finish_shard(index)
        index_name = self._write_index() if len(self.plans) > 1 else None
        self._finished = True
        self.result = WrittenCheckpoint(
            self.directory,
            tuple(p.filename for p in self.plans),
            index_name,
            sum(p.nbytes for p in self.plans),
            len(self._slots),
            self._known_digests(),
            dict(self._nonfinite),
        )
        return self.result

    def _known_digests(self) -> dict[str, str]:
        known = {}
        for plan, header, digest in zip(self.plans, self._headers, self._digests):
            value = digest.hexdigest(len(header) + plan.nbytes)
            if value is not None:
                known[plan.filename] = value
        return known

    def _write_index(self) -> str:
        name = self.prefix + INDEX_SUFFIX
        weight_map = {s.spec.name: self.plans[s.shard].filename for s in self._slots.values()}
        index = {
            "metadata": {
                "total_size": sum(p.nbytes for p in self.plans),
                "total_parameters": sum(s.spec.numel for s in self._slots.values()),
            },
            "weight_map": dict(sorted(weight_map.items())),
        }
        path = self.directory / name
        with _as_write_error(path, None):
            write_text_durably(path, json.dumps(index, indent=2) + "\n")
        return name

    def abort(self) -> None:
        """Closes open files without finishing them (the caller discards the directory)."""
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self._finished = True

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _reserve(fd: int, size: int) -> None:
    # Reserving the space up front turns a full disk into an error now, not at the last tensor.
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Asks the kernel to start writing a range to disk now, without waiting (Linux).

    Without it the dirty pages pile up until the final fsync, which then flushes
    the whole output while nothing else happens. A hint only: no error.
    """
    sync_file_range = libc.sync_file_range()
    if sync_file_range is not None and length:
        sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def write_text_durably(path: Path, text: str) -> None:
    """Writes a small text file and fsyncs it."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class _as_write_error:
    """Turns an OSError while writing into an OutputWriteError naming the file and tensor."""

    def __init__(self, path: Path, tensor: str | None) -> None:
        self.path = path
        self.tensor = tensor

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, OSError) and not isinstance(exc, OutputWriteError):
            what, fix = os_error_words(exc)  # the one table of OS errors in words, with their fixes
            raise OutputWriteError(what, path=self.path, tensor=self.tensor, fix=fix) from exc
