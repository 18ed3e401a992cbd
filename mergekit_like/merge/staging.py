"""Moving merge inputs to the compute device and results back, without stalling either side.

On the CPU this is a pass-through: tensors are read into ordinary memory and
computed where they are. On CUDA it follows the usual recipe for overlapping
transfers with compute:

* the reader thread reads a tensor into pinned (page-locked) host memory, at most
  ``chunk_bytes`` at a time, and each chunk goes to the device with a
  non-blocking copy on a copy stream of its own. The reader goes on to the next
  chunk while the copy engine works, and the compute stream keeps computing the
  previous item. A tensor of any size is assembled whole on the device while the
  host holds only a few chunks;
* after an item's copies the reader records an event; the compute thread makes
  its stream wait on that event and marks the item's tensors as used there
  (``record_stream``), so the caching allocator cannot hand their memory to the
  copy stream while kernels still read it;
* results come back into pinned memory in row blocks of at most ``chunk_bytes``,
  and each block goes to the writer once its copy has finished.

Pinned blocks come from torch's caching host allocator: a freed block is reused,
not reallocated, once the copies that read it have finished (torch records an
event for every non-blocking copy from pinned memory).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from mergekit_like.errors import DeviceError

if TYPE_CHECKING:
    from mergekit_like.io.reader import Checkpoint


def planned_device_type(device: str) -> str:
    """The type of device a merge will run on (``cpu`` or ``cuda``), without checking that it is there:
    a plan (``--dry-run`` included) is made on any machine; :func:`resolve_device` checks at the run."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda") or (resolved.type == "cpu" and resolved.index):
        raise DeviceError(f"'{device}' is not a device this tool merges on", fix="use cpu, cuda, cuda:N or auto")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("CUDA was asked for but is not available", fix="use --device cpu or auto")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise DeviceError(f"there is no GPU {resolved.index} (this machine has {torch.cuda.device_count()})",
                         fix="use cuda:N with N below that count, or cuda")
    return resolved


# Large enough that a read is a long sequential request to the disk, small enough
# that the pinned memory in flight (a couple of these, rounded up to a power of
# two by torch's host allocator) stays a small part of the memory budget.
STAGING_CHUNK_BYTES = 32 * 1024 * 1024


def row_blocks(rows: tuple[int, int], row_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Splits rows ``[start, stop)`` into consecutive ranges of at most ``chunk_bytes`` each.

    A row larger than ``chunk_bytes`` goes alone: rows are never split.
    """
    start, stop = rows
    step = max(1, chunk_bytes // row_bytes) if row_bytes else max(1, stop - start)
    return [(first, min(first + step, stop)) for first in range(start, stop, step)]


class DeviceStaging:
    """Reads tensors onto the compute device and brings results back, through staging chunks.

    ``staged`` (default: on CUDA) sends reads and results through ``chunk_bytes``
    chunks even on the CPU, where it only costs a copy; tests use that to check the
    chunking without a GPU.
    """

    def __init__(self, device: torch.device, *, chunk_bytes: int = STAGING_CHUNK_BYTES,
                 staged: bool | None = None) -> None:
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be positive")
        if device.type == "cuda" and device.index is None:
            # Pinned now: "cuda" alone means each thread's current device, which may change.
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.chunk_bytes = chunk_bytes
        self.staged = device.type == "cuda" if staged is None else staged
        self._pin = device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    # -- reader thread ------------------------------------------------------
    def copying(self) -> contextlib.AbstractContextManager[object]:
        """Work issued inside runs on the copy stream (reads, and the casts that follow them)."""
        if self._copy_stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._copy_stream)

    def read(self, checkpoint: Checkpoint, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` (or rows of it) on the device, in its stored dtype; call inside :meth:`copying`."""
        entry = checkpoint.entry(name)
        if not self.staged or not entry.shape:
            return checkpoint.read(name, rows=rows, device=self.device)
        span = rows if rows is not None else (0, entry.shape[0])
        target = torch.empty((span[1] - span[0], *entry.shape[1:]), dtype=entry.dtype, device=self.device)
        for first, stop in row_blocks(span, entry.row_bytes, self.chunk_bytes):
            buffer = self._host_buffer((stop - first) * entry.row_bytes)
            chunk = checkpoint.read(name, rows=(first, stop), out=buffer)
            target[first - span[0]:stop - span[0]].copy_(chunk, non_blocking=self._pin)
        return target

    def fence(self) -> torch.cuda.Event | None:
        """Marks the copies issued so far; the consumer passes it to :meth:`accept`."""
        if self._copy_stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self._copy_stream)
        return event

    # -- compute thread -----------------------------------------------------
    def accept(self, tensors: Iterable[torch.Tensor], fence: torch.cuda.Event | None) -> None:
        """Makes this thread's stream wait for the copies behind ``fence`` before it uses ``tensors``."""
        if fence is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(fence)
        for tensor in tensors:
            if tensor.is_cuda:
                tensor.record_stream(current)

    def download(self, tensor: torch.Tensor) -> Iterator[tuple[int | None, torch.Tensor]]:
        """The result on the host: ``(row offset, block)`` pairs, or ``(None, whole)`` for one piece.

        Each block is complete when it is yielded, so the writer may write it at once.
        """
        # Whole: unstaged, scalars, tensors copied unmerged on the host, and those of no rows.
        split = self.staged and tensor.dim() > 0 and tensor.device == self.device
        row_bytes = tensor[:1].numel() * tensor.element_size() if split else 0
        blocks = row_blocks((0, tensor.shape[0]), row_bytes, self.chunk_bytes) if split else []
        if len(blocks) <= 1:
            yield None, self._to_host(tensor)
            return
        for first, stop in blocks:
            yield first, self._to_host(tensor[first:stop])

    # -- helpers ------------------------------------------------------------
    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pin)

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_cuda:
            return tensor
        host = tensor.to("cpu", non_blocking=True)  # pinned, from the caching host allocator
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(tensor.device))
        done.synchronize()
        return host
