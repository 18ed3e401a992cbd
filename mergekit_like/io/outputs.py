"""Writing one or several output checkpoints from a stream of tensors, atomically.

Shared by every command that produces checkpoints (merge, average, soup):
the outputs (one directory, or one subdirectory per variant of a sweep) are
written by streaming writers inside one temporary directory that is moved
into place only when everything, side files included, is complete.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mergekit_like.errors import IncompatibleModelsError
from mergekit_like.io.atomic import atomic_directory, check_target
from mergekit_like.io.checksums import write_manifest
from mergekit_like.io.sharding import DEFAULT_SHARD_SIZE, TensorSpec
from mergekit_like.io.sidefiles import copy_side_files, write_config
from mergekit_like.io.writer import ShardedWriter, WrittenCheckpoint


class WriteItem(NamedTuple):
    """A tensor (or block of rows, from ``row_start``) for output number ``output``."""

    output: int
    name: str
    value: torch.Tensor
    row_start: int | None = None


# WriteItems in any order the producer likes: a producer may finish one output's
# tensor long before another's and should not hold it.
TensorStream = Iterable[WriteItem]
# Bytes of tensors handed to the writer thread and not yet written. A larger tensor goes
# alone and is written before the next is read, so memory holds one of the largest tensors
# plus this budget, never a shard.
WRITE_QUEUE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class OutputSpec:
    """One output checkpoint, decided in full before the run starts.

    Everything written beside the weights is data here, so the writer needs no callback
    into its caller: the side files of the model it follows (see ``side_files_from``),
    then ``config`` as ``config.json`` when given, then ``files`` (name -> text: the model
    card, the recipe, a state record).
    """

    label: str | None = None  # the subdirectory it is written to; None: the output directory itself
    files: Mapping[str, str] = field(default_factory=dict)
    config: Mapping[str, Any] | None = None


def check_output(output: str | Path, *, overwrite: bool, inputs: Mapping[str, Path] | None = None) -> None:
    """Refuses a target that exists (unless ``overwrite``) or that is, or contains, one of ``inputs``.

    For callers that do long work before they write (a greedy soup's evaluations);
    :func:`write_checkpoints` checks by itself. ``inputs``: reference -> its directory.
    """
    check_target(output, overwrite=overwrite)
    refuse_output_among_inputs(output, inputs or {})


def refuse_output_among_inputs(output: str | Path, inputs: Mapping[str, Path]) -> None:
    """The one guard of every command that writes: the output must not be, or contain, an input."""
    target = Path(output).resolve()
    for ref, root in inputs.items():
        root = root.resolve()
        if target == root or root.is_relative_to(target):
            raise IncompatibleModelsError(
                f"the output directory would replace input '{ref}'", path=output,
                fix="write the output to another directory",
            )


def write_checkpoints(
    output: str | Path,
    outputs: Sequence[OutputSpec],
    specs: Sequence[TensorSpec],
    tensors: TensorStream,
    *,
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_SHARD_SIZE,
    side_files_from: Path | None = None,
    copy_tokenizer: bool = True,
    out_dtype: torch.dtype | None = None,
    inputs: Mapping[str, Path] | None = None,
    refuse_nonfinite: bool = False,
) -> list[WrittenCheckpoint]:
    """Writes one checkpoint per entry of ``outputs`` from one stream of tensors, atomically.

    NaN and infinite values are counted as they are written (each result's ``nonfinite``); with
    ``refuse_nonfinite`` the first tensor holding any fails the write and nothing is put in place.

    The target is checked (see :func:`check_output`; the atomic directory checks it) before
    the stream is first read, so a producer that does work up front (a pre-pass over the
    inputs) does it only for a target that can be written.
    """
    output = Path(output)
    refuse_output_among_inputs(output, inputs or {})
    with atomic_directory(output, overwrite=overwrite) as temp:
        directories = [temp / spec.label if spec.label else temp for spec in outputs]
        for directory in directories:
            directory.mkdir(exist_ok=True)
        writers = [ShardedWriter(d, specs, max_shard_size=max_shard_size, refuse_nonfinite=refuse_nonfinite)
                   for d in directories]
        try:
            _write_in_background(writers, tensors)
            written = [writer.close() for writer in writers]
        except BaseException:
            for writer in writers:
                writer.abort()
            raise
        for spec, directory, result in zip(outputs, directories, written):
            if side_files_from is not None:
                copy_side_files(side_files_from, directory, out_dtype, tokenizer=copy_tokenizer)
            if spec.config is not None:
                write_config(directory, spec.config, out_dtype)
            for name, text in spec.files.items():
                (directory / name).write_text(text, encoding="utf-8")
            # Last, so it covers every file written above: `verify` fails a file it does not list.
            write_manifest(directory, result.digests)
    return [dataclasses.replace(w, directory=output / spec.label if spec.label else output)
            for spec, w in zip(outputs, written)]


def _write_in_background(writers: Sequence[ShardedWriter], items: TensorStream) -> None:
    """Hands each item to a writer thread, so disk writes overlap reading and computing."""
    pending: queue.Queue[WriteItem | None] = queue.Queue()
    failure: list[BaseException] = []
    room = threading.Condition()
    queued = [0]  # bytes handed to the writer thread and not yet written

    def size(item: WriteItem) -> int:
        return item.value.numel() * item.value.element_size()

    def drain() -> None:
        while True:
            item = pending.get()
            if item is None:
                return
            nbytes = size(item)
            try:
                if not failure:  # after a failure, keep draining so the producer never blocks
                    writers[item.output].write(item.name, item.value, row_start=item.row_start)
            except BaseException as exc:
                failure.append(exc)
            del item  # written: let it go before waiting for the next one
            with room:
                queued[0] -= nbytes
                room.notify()

    def reserve(nbytes: int) -> None:
        with room:
            room.wait_for(lambda: queued[0] == 0 or queued[0] + nbytes <= WRITE_QUEUE_BYTES)
            queued[0] += nbytes

    thread = threading.Thread(target=drain, name="writer", daemon=True)
    thread.start()
    try:
        for item in items:
            if failure:
                break
            nbytes = size(item)
            reserve(nbytes)
            pending.put(item)
            del item  # the writer owns it now; holding it here would keep it alive during the next read
            if nbytes > WRITE_QUEUE_BYTES:
                # A tensor over the budget is written before the next is read, so memory never
                # holds two of the largest tensors at once.
                with room:
                    room.wait_for(lambda: queued[0] == 0)
    finally:
        pending.put(None)
        thread.join()
    if failure:
        raise failure[0]
