"""The sidecar process: owns the float32 averages, folds in snapshots, writes checkpoints.

It runs in a spawned process so the training process never does averaging
work. The trainer copies its weights into shared-memory buffers and sends
``("snapshot", step)``; the sidecar folds the buffers into every averager (a
float32 copy, after which the buffers are free again), and every
``save_every`` steps writes each average as a ready-to-load Hugging Face
directory, atomically, updates a ``latest`` link, and saves each averager's
``state_dict()`` so a restarted sidecar or a resumed run continues exactly.
If the trainer process disappears, the sidecar saves what it has and exits.

A save that fails (a full disk, a directory taken away) does not stop the
averaging: the trainer is told once, as a ``("notice", None, ("warning", text))``
on the reply pipe, and the save is tried again after :data:`SAVE_RETRY_FIRST`
seconds, twice as long after each further failure, at most every
:data:`SAVE_RETRY_MOST` seconds (also while no snapshot comes), until one succeeds.

``out_dir`` belongs to one hook at a time: the sidecar inherits the trainer's
:class:`~mergekit_like.hook.out_dir.OutDirLock`, so it stays taken while an orphaned
sidecar still saves.

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
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import torch

from mergekit_like.averaging.base import Averager, StateDict, StoredSnapshot
from mergekit_like.errors import HookUsageError, InvalidCheckpointError, UnknownAverageError
from mergekit_like.hook.out_dir import OutDirLock
from mergekit_like.hook.process import StopRequest, name_process, take_signals
from mergekit_like.hook.shards import written_dtype
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
# After a failed save the next try waits this long, doubling after each further failure up to
# SAVE_RETRY_MOST: soon enough to save once space is freed, rare enough not to hammer a full disk.
SAVE_RETRY_FIRST = 1.0
SAVE_RETRY_MOST = 300.0
# Doublings after which the delay is SAVE_RETRY_MOST anyway (keeps 2 ** n a small number).
MAX_DOUBLINGS = 30
# A message about the sidecar's saves for the trainer, which shows it: (level, text), level "warning" or "info";
# or (SAVED, step) after each save and at start (the step of the averages restored; "" for none), which the
# trainer keeps to say what a dead sidecar lost.
Notify = Callable[[str, str], None]
SAVED = "saved"


@dataclass
class SaveRetries:
    """When a failed save is tried again: SAVE_RETRY_FIRST s after the first failure, doubling to SAVE_RETRY_MOST."""

    failures: int = 0
    next_try: float = 0.0  # time.monotonic() from when a save may be tried

    def due(self, now: float) -> bool:
        return now >= self.next_try

    def failed(self, now: float) -> float:
        """Counts a failure; returns the delay until the next try."""
        delay = min(SAVE_RETRY_FIRST * 2 ** min(self.failures, MAX_DOUBLINGS), SAVE_RETRY_MOST)
        self.failures += 1
        self.next_try = now + delay
        return delay

    def succeeded(self) -> int:
        """Resets after a save that worked; returns how many had failed before it."""
        failures, self.failures, self.next_try = self.failures, 0, 0.0
        return failures


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
    lock: OutDirLock | None = None  # held by the sidecar too (see OutDirLock); None in-process
    out_dtype: torch.dtype | None = None  # the ready-to-load averages' floating dtype; None: the model's


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
            if message[0] != "notice":  # a notice is for a trainer that runs: none is owed to a dead one
                logger.warning("the training process reads no answers any more; one was dropped")


def run_sidecar(
    settings: SidecarConfig,
    buffers: dict[str, torch.Tensor],
    commands: Any,
    replies: ReplyPipe,
    free: Any,
    started: Any,
) -> None:
    """The sidecar's main loop (the target of the spawned process); ``free`` and ``started`` are
    :class:`~mergekit_like.hook.process.SharedFlag`s."""
    stop = take_signals()  # SIGINT ignored (the trainer's close() saves), SIGTERM: save and exit
    name_process()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # leave the cores to the trainer
    try:
        sidecar = Sidecar(settings, buffers, notify=_notifier(replies))
    except Exception as exc:
        # The trainer reads this when it finds the sidecar gone before it ever started.
        logger.exception("the averaging sidecar could not start")
        replies.put(("error", None, ("startup", str(exc))))
        return
    started.set()
    free.set()
    while not _told_to_stop(stop, sidecar):
        try:
            message = commands.get(timeout=PARENT_POLL)
        except queue.Empty:
            if not _alive(settings.parent_pid):
                logger.warning("the training process is gone; saving the averages and exiting")
                sidecar.save_at_exit()
                return
            sidecar.retry_save()  # a failed save is tried again while no snapshot comes
            continue
        if not serve(sidecar, message, replies, free):
            return


def _told_to_stop(stop: StopRequest, sidecar: Sidecar) -> bool:
    """After SIGTERM: saves (once) and says the loop is over."""
    if not stop:
        return False
    logger.warning("the averaging sidecar got signal %s; saving the averages and exiting", stop.signal)
    sidecar.save_at_exit()
    return True


def _notifier(replies: ReplyPipe) -> Notify:
    """Sends a message about the saves to the trainer, which shows it (request None: it answers nothing)."""
    return lambda level, text: replies.put(("notice", None, (level, text)))


def serve(sidecar: Sidecar, message: tuple[Any, ...], replies: Any, free: Any) -> bool:
    """Handles one message; returns False once the sidecar is to stop."""
    kind = message[0]
    if kind == "snapshot":
        try:
            sidecar.fold(message[1])
        except Exception:
            # Nobody waits for an answer to a snapshot: the log is where this failure shows.
            logger.exception("the snapshot of step %s was not averaged", message[1])
        else:
            sidecar.persist()  # a failed save is reported and retried, never taken for a failed fold
        finally:
            free.set()
        return True
    _, request, argument = message
    try:
        if kind == "average":
            value: Any = sidecar.average(argument)
        elif kind == "close":
            sidecar.store_snapshots(final=True)
            sidecar.save()  # tried whatever the retry delay: it is the last chance
            value = sidecar.last_step
        else:
            raise HookUsageError(f"the sidecar takes no request {kind!r}")
    except Exception as exc:
        replies.put(("error", request, (type(exc).__name__, str(exc))))
    else:
        replies.put(("ok", request, value))
    return kind != "close"  # a failed last save still ends the sidecar: the trainer is closing


def _log_notice(level: str, text: str) -> None:
    """Where a message about the saves goes in a sidecar used in-process (tests): the log."""
    if level == SAVED:
        return
    logger.log(logging.WARNING if level == "warning" else logging.INFO, "%s", text)


def _alive(pid: int) -> bool:
    # Re-parented means our trainer is gone, even if its pid was reused since.
    return pid_alive(pid) and os.getppid() == pid


class Sidecar:
    """The averaging state and its persistence (usable in-process for tests)."""

    def __init__(self, settings: SidecarConfig, buffers: dict[str, torch.Tensor], *,
                 notify: Notify | None = None) -> None:
        self.settings = settings
        self.buffers = buffers
        self.notify = notify or _log_notice
        self.retries = SaveRetries()
        self._said_behind = False
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
        """Folds the buffers in as the snapshot of ``step`` into every average that has no later one."""
        behind = [a for a in self.averagers if a.last_step is not None and step <= a.last_step]
        with torch.no_grad():
            for averager in self.averagers:
                if averager not in behind:
                    averager.update(self.buffers, step)
        if behind:
            self._say_behind(step, behind)
        self.last_step = max(step, self.last_step or step)

    def _say_behind(self, step: int, behind: list[Averager]) -> None:
        """Says once that snapshots are ignored: a resumed run that did not pass its step would lose them silently."""
        if self._said_behind:
            return
        self._said_behind = True
        restored = max(a.last_step or 0 for a in behind)
        labels = ", ".join(a.label for a in behind)
        self.notify("warning", f"the snapshot of step {step} is not averaged into {labels}: the averages restored "
                               f"from {self.settings.out_dir} are at step {restored}, and snapshots up to that are "
                               f"ignored; a resumed run passes start_step=global_step")

    def save_due(self) -> bool:
        every = self.settings.save_every
        # Due once the step crosses a multiple of save_every (4, 8, ... for save_every=4).
        return bool(every and self.last_step is not None and self.last_step // every > (self.saved_step or 0) // every)

    # -- saving through failures -------------------------------------------------------
    def persist(self) -> None:
        """After a fold: stores due snapshots and saves when due; a failure is reported once, the save retried."""
        try:
            self.store_snapshots()
        except Exception as exc:  # post-hoc EMA's profile of this step is lost; the average is not
            self._failed("a stored snapshot", exc)
        self.retry_save()

    def retry_save(self) -> None:
        """Saves if a save is due (a failed one stays due) and the delay after a failure has passed."""
        if not self.save_due() or not self.retries.due(time.monotonic()):
            return
        try:
            self.save()
        except Exception as exc:
            self._failed("the averages", exc)
            return
        failed = self.retries.succeeded()
        if failed:
            self.notify("info", f"the averages are saved again in {self.settings.out_dir} (step {self.last_step}, "
                                f"after {failed} failed tries)")

    def _failed(self, what: str, exc: Exception) -> None:
        first = self.retries.failures == 0
        delay = self.retries.failed(time.monotonic())
        if not first:
            return  # said once until a save works again: a full disk would otherwise fill the log
        if not isinstance(exc, OSError):  # not the disk: a bug, whose traceback is worth one log entry
            logger.error("saving in %s failed", self.settings.out_dir, exc_info=exc)
        self.notify("warning", f"{what} could not be saved in {self.settings.out_dir}: {type(exc).__name__}: "
                               f"{str(exc).rstrip('.')}; "
                               f"averaging goes on, and the save is tried again in {delay:g} s, then after twice "
                               f"as long each time (at most {SAVE_RETRY_MOST:g} s) until it works")

    def save_at_exit(self) -> None:
        """The save of a sidecar whose trainer is gone: one try, whose failure only the log can tell."""
        try:
            self.store_snapshots(final=True)
            self.save()
        except Exception as exc:
            logger.error("the averages could not be saved in %s: %s: %s; the last saved ones remain",
                         self.settings.out_dir, type(exc).__name__, exc)

    def average(self, label: str) -> dict[str, torch.Tensor]:
        """A copy of the average ``label``; an error naming the labels, or saying it holds nothing yet."""
        averager = next((a for a in self.averagers if a.label == label), None)
        if averager is None:
            raise UnknownAverageError(f"no average named {label!r} (this hook keeps: {', '.join(self.labels)})")
        if not averager.ready:
            raise HookUsageError(f"the average {label!r} holds no snapshot yet; ask for it once step() has "
                                 f"taken a snapshot that it accepts")
        return averager.result_copy()

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
        """Writes every ready average as step_N/, moves ``latest``, and saves the state.

        Every average is tried even when one fails (a directory of one taken away); the first
        failure is raised after, and the save stays owed.
        """
        if self.last_step is None or self.last_step == self.saved_step:
            return
        failure: Exception | None = None
        for averager in self.averagers:
            if averager.ready:
                try:
                    self._write_average(averager)
                    self._write_state(averager)
                except Exception as exc:
                    failure = failure or exc
        if failure is not None:
            raise failure
        self.saved_step = self.last_step
        self.notify(SAVED, str(self.saved_step))

    def _write_average(self, averager: Averager) -> None:
        root = self.settings.out_dir / averager.label
        target = root / f"step_{self.last_step}"
        result = averager.result()
        out_dtype = self.settings.out_dtype
        dtypes = {n: written_dtype(b.dtype, out_dtype) for n, b in self.buffers.items()}
        # Names and shapes from the buffers: reading a lazy average (LAWA's) computes each tensor, once.
        specs = [TensorSpec(n, dtypes[n], tuple(self.buffers[n].shape)) for n in result]
        items = (WriteItem(0, n, result[n].to(dtypes[n])) for n in result)
        write_checkpoints(target, [OutputSpec(config=self.settings.config)], specs, items, overwrite=True,
                          out_dtype=out_dtype)
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
                refuse_other_names(directory, averager, self.buffers.keys())
            if averager.last_step is not None:
                self.last_step = max(self.last_step or 0, averager.last_step)
        self.saved_step = self.last_step
        self.notify(SAVED, "" if self.saved_step is None else str(self.saved_step))


def refuse_other_names(directory: Path, averager: Averager, names: Iterable[str]) -> None:
    """Raises :class:`InvalidCheckpointError` when a restored average holds other tensors than the model.

    Every later snapshot would fail to fold: the averages would stay at their restored step unseen.
    """
    if not averager.ready:
        return
    held, live = set(averager.result()), set(names)
    if held == live:
        return
    extra, missing = sorted(held - live), sorted(live - held)
    example = f"{extra[0]!r} where the model has {missing[0]!r}" if extra and missing else repr((extra or missing)[0])
    raise InvalidCheckpointError(
        f"holds an average of other tensors than the model's ({len(extra)} not in the model, {len(missing)} "
        f"missing; e.g. {example}); averages saved before the hook looked inside DDP, torch.compile or "
        f"Lightning wrappers carry their 'module.', '_orig_mod.' or 'model.' prefix", path=directory,
        fix="remove this state directory to start the average afresh, or resume with the model it was saved for")


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
