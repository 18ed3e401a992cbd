"""The sidecar process: owns the float32 averages, folds in snapshots, writes checkpoints.

It runs in a spawned process so the training process never does averaging
work. The trainer copies its weights into shared-memory buffers and sends
``("snapshot", step)``; the sidecar folds the buffers into every averager (a
float32 copy, after which the buffers are free again), and every
``save_every`` steps writes each average as a ready-to-load Hugging Face
directory, atomically, updates a ``latest`` link, and saves each averager's
``state_dict()`` so a restarted sidecar or a resumed run continues exactly.
If the trainer process disappears, the sidecar saves what it has and exits.

Requests (``("average", id, label)``, ``("close", id, None)``) are answered on the
reply pipe (a :class:`ReplyPipe`) with ``("ok", id, value)`` or ``("error", id, (kind,
message))``: a bad request is an answer, never the sidecar's end.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import queue
import shutil
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import torch

from mergekit_like.averaging.base import Averager, StateDict, StoredSnapshot
from mergekit_like.errors import HookUsageError, InvalidCheckpointError, UnknownAverageError
from mergekit_like.io.atomic import pid_alive
from mergekit_like.io.outputs import OutputSpec, WriteItem, write_checkpoints
from mergekit_like.io.reader import open_checkpoint
from mergekit_like.io.sharding import TensorSpec

logger = logging.getLogger(__name__)

STATE_DIR = "state"
STATE_FILE = "state.json"
LATEST = "latest"
# How often (seconds) an idle sidecar checks that its trainer still runs.
PARENT_POLL = 1.0
# Keys of state.json that describe the average rather than belong to its state dict.
DESCRIPTION_KEYS = ("label", "kind")


@dataclass
class SidecarConfig:
    """Everything the sidecar needs, sent to it once at spawn."""

    out_dir: Path
    averagers: list[Averager]
    save_every: int | None
    keep_last: int = 2
    config: dict[str, Any] | None = None  # the model's config.json, when it has one
    parent_pid: int = field(default_factory=os.getpid)
    device: str = "cpu"


class ReplyPipe:
    """The sidecar's end of the reply pipe; ``put`` sends one whole answer, as ``Queue.put`` would.

    A pipe of which the trainer keeps no writing end, not a queue (whose writing end the trainer
    holds too): once the sidecar is gone, even halfway through an answer, the trainer's reader of
    answers finds the pipe's end instead of waiting forever for the rest.
    """

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def put(self, message: tuple[Any, ...]) -> None:
        try:
            data = ForkingPickler.dumps(message)
        except Exception as exc:  # e.g. no shared memory left for an average's tensors: the trainer gets why
            data = ForkingPickler.dumps(("error", message[1], (type(exc).__name__,
                                                              f"its answer could not be sent: {exc}")))
        try:
            self.connection.send_bytes(data)
        except OSError:  # a broken pipe: the trainer is gone, and the main loop saves once it notices
            logger.warning("the training process reads no answers any more; one was dropped")


def run_sidecar(
    settings: SidecarConfig,
    buffers: dict[str, torch.Tensor],
    commands: Any,
    replies: ReplyPipe,
    free: Any,
    started: Any,
) -> None:
    """The sidecar's main loop (the target of the spawned process)."""
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # leave the cores to the trainer
    try:
        sidecar = Sidecar(settings, buffers)
    except Exception as exc:
        # The trainer reads this when it finds the sidecar gone before it ever started.
        logger.exception("the averaging sidecar could not start")
        replies.put(("error", None, ("startup", str(exc))))
        return
    started.set()
    free.set()
    while True:
        try:
            message = commands.get(timeout=PARENT_POLL)
        except queue.Empty:
            if not _alive(settings.parent_pid):
                logger.warning("the training process is gone; saving the averages and exiting")
                sidecar.store_snapshots(final=True)
                sidecar.save()
                return
            continue
        if not serve(sidecar, message, replies, free):
            return


def serve(sidecar: Sidecar, message: tuple[Any, ...], replies: Any, free: Any) -> bool:
    """Handles one message; returns False once the sidecar is to stop."""
    kind = message[0]
    if kind == "snapshot":
        try:
            sidecar.fold(message[1])
            sidecar.store_snapshots()
            sidecar.save_if_due()
        except Exception:
            # Nobody waits for an answer to a snapshot: the log is where this failure shows.
            logger.exception("the snapshot of step %s was not averaged", message[1])
        finally:
            free.set()
        return True
    _, request, argument = message
    try:
        if kind == "average":
            value: Any = sidecar.average(argument)
        elif kind == "close":
            sidecar.store_snapshots(final=True)
            sidecar.save()
            value = sidecar.last_step
        else:
            raise HookUsageError(f"the sidecar takes no request {kind!r}")
    except Exception as exc:
        replies.put(("error", request, (type(exc).__name__, str(exc))))
    else:
        replies.put(("ok", request, value))
    return kind != "close"  # a failed last save still ends the sidecar: the trainer is closing


def _alive(pid: int) -> bool:
    # Re-parented means our trainer is gone, even if its pid was reused since.
    return pid_alive(pid) and os.getppid() == pid


class Sidecar:
    """The averaging state and its persistence (usable in-process for tests)."""

    def __init__(self, settings: SidecarConfig, buffers: dict[str, torch.Tensor]) -> None:
        self.settings = settings
        self.buffers = buffers
        self.averagers = [copy.deepcopy(a) for a in settings.averagers]
        for averager in self.averagers:  # the float32 state lives on the sidecar's device
            averager.device = torch.device(settings.device)
        self.last_step: int | None = None
        self.saved_step: int | None = None
        self.restore()

    @property
    def labels(self) -> list[str]:
        return [a.label for a in self.averagers]

    def fold(self, step: int) -> None:
        with torch.no_grad():
            for averager in self.averagers:
                if averager.last_step is None or step > averager.last_step:
                    averager.update(self.buffers, step)
        self.last_step = step

    def save_if_due(self) -> None:
        every = self.settings.save_every
        # Due once the step crosses a multiple of save_every (4, 8, ... for save_every=4).
        if every and self.last_step is not None and self.last_step // every > (self.saved_step or 0) // every:
            self.save()

    def average(self, label: str) -> dict[str, torch.Tensor]:
        """A copy of the average ``label``; an error naming the labels, or saying it holds nothing yet."""
        averager = next((a for a in self.averagers if a.label == label), None)
        if averager is None:
            raise UnknownAverageError(f"no average named {label!r} (this hook keeps: {', '.join(self.labels)})")
        if not averager.ready:
            raise HookUsageError(f"the average {label!r} holds no snapshot yet; ask for it once step() has "
                                 f"taken a snapshot that it accepts")
        return {n: t.clone() for n, t in averager.result().items()}

    # -- persistence ---------------------------------------------------------------
    def store_snapshots(self, *, final: bool = False) -> None:
        """Writes the snapshots the averagers keep beside their averages (post-hoc EMA's profiles)."""
        for averager in self.averagers:
            for stored in averager.stored_snapshots(final=final):
                self._write_stored(averager, stored)

    def _write_stored(self, averager: Averager, stored: StoredSnapshot) -> None:
        target = self.settings.out_dir / averager.label / stored.name
        dtypes = {n: stored.dtype if t.is_floating_point() else t.dtype for n, t in stored.tensors.items()}
        specs = [TensorSpec(n, dtypes[n], tuple(t.shape)) for n, t in stored.tensors.items()]
        items = (WriteItem(0, n, t.to(dtypes[n])) for n, t in stored.tensors.items())
        files = {stored.info_file: json.dumps(dict(stored.info)) + "\n"}
        write_checkpoints(target, [OutputSpec(files=files)], specs, items, overwrite=True)

    def save(self) -> None:
        """Writes every ready average as step_N/, moves ``latest``, and saves the state."""
        if self.last_step is None or self.last_step == self.saved_step:
            return
        for averager in self.averagers:
            if averager.ready:
                self._write_average(averager)
                self._write_state(averager)
        self.saved_step = self.last_step

    def _write_average(self, averager: Averager) -> None:
        root = self.settings.out_dir / averager.label
        target = root / f"step_{self.last_step}"
        result = averager.result()
        dtypes = {n: b.dtype for n, b in self.buffers.items()}
        specs = [TensorSpec(n, dtypes[n], tuple(t.shape)) for n, t in result.items()]
        items = (WriteItem(0, n, t.to(dtypes[n])) for n, t in result.items())

        write_checkpoints(target, [OutputSpec(config=self.settings.config)], specs, items, overwrite=True)
        _point_latest(root, target.name)
        _prune(root, self.settings.keep_last)

    def _write_state(self, averager: Averager) -> None:
        write_state(self.settings.out_dir / averager.label / STATE_DIR, averager)

    def restore(self) -> None:
        """Loads each averager's saved state, if any (a restarted sidecar or a resumed run)."""
        for averager in self.averagers:
            directory = self.settings.out_dir / averager.label / STATE_DIR
            if (directory / STATE_FILE).exists():
                load_state(directory, averager)
            if averager.last_step is not None:
                self.last_step = max(self.last_step or 0, averager.last_step)
        self.saved_step = self.last_step


def write_state(directory: Path, averager: Averager) -> None:
    """Saves ``averager.state_dict()``: its tensors as safetensors, the rest as ``state.json``."""
    state = averager.state_dict()
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    meta = {"label": averager.label, "kind": type(averager).__name__,
            **{key: value for key, value in state.items() if key not in tensors}}
    specs = [TensorSpec(key, tensor.dtype, tuple(tensor.shape)) for key, tensor in tensors.items()]
    items = [WriteItem(0, key, tensor) for key, tensor in tensors.items()]
    spec = OutputSpec(files={STATE_FILE: json.dumps(meta) + "\n"})
    write_checkpoints(directory, [spec], specs, items, overwrite=True)


def load_state(directory: Path, averager: Averager) -> None:
    """Restores ``averager`` from a state directory written by :func:`write_state`."""
    path = directory / STATE_FILE
    fix = "remove the state directory to start this average afresh"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):  # bad JSON or UTF-8; RecursionError: absurdly deep nesting
        raise InvalidCheckpointError("is not valid JSON", path=path, fix=fix) from None
    if not isinstance(meta, dict):
        raise InvalidCheckpointError("is not a JSON object", path=path, fix=fix)
    kind = meta.get("kind", type(averager).__name__)
    if kind != type(averager).__name__:
        raise InvalidCheckpointError(f"holds the state of a {kind}, not of a {type(averager).__name__}", path=path,
                                     fix=fix)
    with open_checkpoint(directory) as checkpoint:
        state: StateDict = {n: checkpoint.read(n) for n in checkpoint.names()}
    state.update({key: value for key, value in meta.items() if key not in DESCRIPTION_KEYS})
    try:
        averager.load_state_dict(state)
    except (KeyError, ValueError, TypeError) as exc:
        raise InvalidCheckpointError(f"is no state of {averager.label}: {exc}", path=directory, fix=fix) from None


def _point_latest(root: Path, name: str) -> None:
    """Atomically points ``root/latest`` at ``name`` (a relative symlink)."""
    temporary = root / f".{LATEST}.{os.getpid()}"
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    os.symlink(name, temporary)
    os.replace(temporary, root / LATEST)


def _prune(root: Path, keep_last: int) -> None:
    saved = sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name[5:]))
    for old in saved[: max(0, len(saved) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
