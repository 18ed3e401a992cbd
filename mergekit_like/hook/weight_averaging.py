"""The training-loop hook: snapshots go to a sidecar process; the step never waits for it.

    avg = WeightAveraging(model, [EMA(decay=0.999), LAWA(k=5, nu=1000)], snapshot_every=1000,
                          out_dir="runs/avg", save_every=1000)
    for batch in loader:
        ...; optimizer.step(); optimizer.zero_grad()
        avg.step()          # returns at once
    avg.close()             # flushes and writes the final averages

A snapshot copies the parameters and floating buffers into shared host memory
in the model's own dtype: on CUDA on a side stream into page-locked shared
memory, so the host never waits and the GPU holds no extra model copy; on the
CPU as a plain copy. If the sidecar is still busy with the previous snapshot
the hook skips this one and counts it (``strict=True`` waits instead). If the
sidecar dies, the next snapshot step starts a new one from its last saved state
and skips snapshots until it runs; one that reports it cannot start (a corrupt
state) is a SidecarError naming the cause instead, and one killed by a signal
before it ran is restarted at most MAX_UNSTARTED_RESTARTS times in a row. Every
wait for the sidecar is bounded and checks, in short slices, that it still runs;
its answers are read whole by a thread of the hook, so one that dies halfway
through an answer leaves no caller reading the rest forever.

A tensor the model replaces (``param.data = t``, a new Parameter or module,
``load_state_dict(..., assign=True)``) is followed at the next snapshot: each snapshot
compares the live tensors' pointers and layouts with the bound ones (no copy). One of
another shape or dtype, or a tensor added or removed, is a HookUsageError naming it.
``out_dir`` is created, checked and locked when the hook is made (one hook per out_dir);
a save that fails later is one warning at the next ``step()`` while averaging goes on.

``with avg.swapped_in("ema_0.999"): evaluate(model)`` evaluates with an average:
the training weights go to host memory (one copy, in their own dtype), the
average is copied into the live parameters and floating buffers a chunk at a
time, and on leaving the block (also by an exception) the training weights are
copied back bit for bit. Only a process that runs a sidecar has the average: under
DDP that is rank 0 alone (nothing is broadcast); under FSDP every rank swaps its shard.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import os
import queue
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import process as mp_process
from multiprocessing import spawn
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from mergekit_like.averaging.base import Averager
from mergekit_like.averaging.lawa import LAWA
from mergekit_like.averaging.sfa import check_beta, sfa_pull
from mergekit_like.errors import HookUsageError, SidecarError, UnknownAverageError
from mergekit_like.hook.shards import is_sharded, local_tensor, shard_directory, write_manifest
from mergekit_like.hook.sidecar import OutDirLock, ReplyPipe, SidecarConfig, prepare_out_dir, run_sidecar

logger = logging.getLogger(__name__)

# How long an answer of the sidecar (an average, the final save) may take before the hook gives up on it.
REPLY_TIMEOUT = 600.0
CLOSE_TIMEOUT = 600.0
# How long a strict snapshot waits for the sidecar to free the buffers (it may be folding a large model).
FREE_TIMEOUT = 600.0
# Every wait is cut into slices this long, between checks that the sidecar still runs.
POLL_INTERVAL = 0.1
# How long the first snapshot waits for a starting sidecar (its torch import takes seconds); later
# snapshots never wait unless strict.
FIRST_SNAPSHOT_WAIT = 60.0
# How long close() waits for the sidecar process to exit once it has saved.
JOIN_TIMEOUT = 30.0
# How long close() waits, once the sidecar has exited, for the reader of its answers to find the pipe's end.
READER_JOIN_TIMEOUT = 5.0
# Elements per host-to-device chunk of the SFA merge-back (bounds GPU scratch).
SFA_CHUNK = 16 * 1024 * 1024
# Sidecars killed by a signal (the OOM killer, say) before they ran, in a row, after which the hook gives up:
# one that is killed every time it restores its state would otherwise be restarted forever.
MAX_UNSTARTED_RESTARTS = 3
# Tensors an error about a changed model names before it says "and N more".
MAX_NAMED = 3
CHANGED_MODEL_FIX = ("close this hook and make a new WeightAveraging, with another out_dir, for the changed model "
                     "(or change the model before making the hook)")


@dataclass
class SFA:
    """Sequential fine-tuning with averaging (Kleiman et al., "Soup to go", 2025).

    Every ``ceil(p * steps_per_task)`` steps of a task, and at ``end_task()``,
    the live model becomes (1 - beta) theta + beta theta_o, theta_o being the
    model at ``start_task()``. ``rolling`` re-takes theta_o after each merge.
    Published defaults were not found; beta = 0.5 and p = 0.25 are ours.
    """

    beta: float = 0.5
    p: float = 0.25
    steps_per_task: int | None = None
    rolling: bool = False

    def __post_init__(self) -> None:
        check_beta(self.beta)
        if not self.p > 0:
            raise ValueError(f"p must be positive, got {self.p}")
        if self.steps_per_task is not None and self.steps_per_task < 1:
            raise ValueError(f"steps_per_task must be at least 1, got {self.steps_per_task}")

    @property
    def every(self) -> int | None:
        if self.steps_per_task is None or self.p >= 1:
            return None
        return max(1, math.ceil(self.p * self.steps_per_task))


@dataclass
class SnapshotCounts:
    taken: int = 0
    skipped: int = 0
    sidecar_restarts: int = 0


def _rank() -> int:
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return int(distributed.get_rank())
    return 0


class _SidecarLink:
    """One sidecar process and its channels.

    The process is started from a thread: spawning writes the pickled handles of the
    shared buffers into a pipe that the child drains only once it has imported the
    trainer's main module; past the pipe's 64 KiB (some hundreds of tensors) ``start()``
    itself would wait seconds, inside a training step when it restarts a sidecar.

    Answers come on a pipe whose writing end only the sidecar keeps, and a thread of
    this link moves each whole answer onto :attr:`answers`, where callers wait in
    slices. Reading a pipe has no timeout once a message has begun (the timeout of
    ``Queue.get`` bounds only its first bytes), and an average's answer, an entry per tensor, outgrows
    the pipe's 64 KiB: a sidecar killed halfway through one would leave its reader
    waiting for the rest. Here that reader finds the pipe's end and stops, and were it
    stuck (a forked process keeping the writing end), it is left behind with its link:
    a daemon that holds nothing the caller needs.
    """

    def __init__(self, settings: SidecarConfig, buffers: dict[str, torch.Tensor]) -> None:
        context = mp.get_context("spawn")
        self.commands = context.Queue()
        receiving, self._sending = context.Pipe(duplex=False)
        self.answers: queue.Queue[Any] = queue.Queue()  # whole answers, or why one could not be read
        self.notices: queue.Queue[tuple[str, str]] = queue.Queue()  # (level, text) about saves, for the trainer
        self._reader = threading.Thread(target=_read_answers, args=(receiving, self.answers, self.notices),
                                        name="mergekit-like-sidecar-replies", daemon=True)
        self._reader.start()
        self.free = context.Event()  # set by the sidecar when the buffers may be written: at start, after a fold
        self.started = context.Event()  # set once, when it has restored its state and runs
        # Why it could not start, once known: whoever reads its report first keeps it here for the others.
        self.said: str | None = None
        self._asked = False  # whether the answers were searched for that report
        self.process = context.Process(
            target=run_sidecar,
            args=(settings, buffers, self.commands, ReplyPipe(self._sending), self.free, self.started),
            name="mergekit-like-sidecar", daemon=True,
        )
        self._spawner = threading.Thread(target=self._spawn, name="mergekit-like-sidecar-spawn", daemon=True)
        self._spawner.start()

    def _spawn(self) -> None:
        try:
            with _spawnable_main():
                self.process.start()
        except Exception as exc:  # e.g. an averager that cannot be pickled: no process, so nothing else says it
            self.said = f"it could not be spawned: {type(exc).__name__}: {exc}"
        finally:
            # The child has its own copy now; with ours closed, the pipe ends when the sidecar does.
            self._sending.close()

    @property
    def alive(self) -> bool:
        """Whether the sidecar runs, or is still being spawned."""
        return self._spawner.is_alive() or self.process.is_alive()

    @property
    def killed(self) -> bool:
        """Whether the process ended by a signal (a negative exit code), not by an exit of its own."""
        code = self.process.exitcode
        return code is not None and code < 0

    def reply(self, timeout: float) -> tuple[str, int, Any] | None:
        """The next answer to a request, or None after ``timeout``.

        The sidecar's report that it could not start, ``("error", None, ("startup", message))``,
        answers no request: it is kept in :attr:`said` and read as no answer.
        """
        try:
            answer = self.answers.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(answer, Exception):  # a whole answer whose shared tensors could not be opened
            raise answer
        status, request, value = answer
        if request is None:
            self.said = str(value[1])
            return None
        return status, request, value

    def startup_error(self) -> str | None:
        """What a sidecar that exited before it started said about it, if anything."""
        if self.said is None and not self._asked:
            self._asked = True
            try:
                self.reply(POLL_INTERVAL)
            except Exception:  # a reply that cannot be read
                pass
        return self.said

    def join(self, timeout: float) -> None:
        self._spawner.join(timeout)
        if self.process.pid is not None:
            self.process.join(timeout)

    def close(self, *, flush: bool) -> None:
        """Closes the channels; ``flush`` for a sidecar that answered its last request and exited.

        Only then is the reader joined (it has found the pipe's end, or does within a bound); a dead
        sidecar's reader stops by itself, or is left behind, and a restart never waits for it.
        """
        self.commands.close()
        if flush:
            self.commands.join_thread()
            self._reader.join(READER_JOIN_TIMEOUT)
        else:
            self.commands.cancel_join_thread()  # nobody reads a dead sidecar's pipe any more


def _read_answers(pipe: Connection, answers: queue.Queue[Any], notices: queue.Queue[tuple[str, str]]) -> None:
    """Moves each whole message of the sidecar's reply pipe onto ``answers`` (notices onto ``notices``)
    until the pipe ends."""
    try:
        while True:
            try:
                data = pipe.recv_bytes()
            except (EOFError, OSError):  # the sidecar is gone (perhaps halfway through a message)
                return
            try:
                message = ForkingPickler.loads(data)
            except Exception as exc:  # e.g. the shared tensors of an answer went with a dying sidecar
                answers.put(exc)
                continue
            if message[0] == "notice":  # answers no request: the trainer shows it at its next step()
                notices.put(message[2])
            else:
                answers.put(message)
    finally:
        pipe.close()


# Held while a sidecar is spawned with the stand-in of spawn.get_preparation_data (one at a time).
_SPAWN_LOCK = threading.Lock()


@contextmanager
def _spawnable_main() -> Iterator[None]:
    """Lets a sidecar be spawned from a main script that cannot be read again (``python - < train.py``).

    The spawn start method re-runs the parent's ``__main__`` in the child from ``__main__.__file__``;
    for a script read from standard input that is ``'<stdin>'``, and the child dies of a
    FileNotFoundError before it runs. The sidecar needs nothing of the parent's main script (its
    target lives in this package; :func:`_refuse_unspawnable_averagers` refuses averages defined
    there), so while the spawn prepares the child the path is left out, as for ``python -c``. The
    stand-in replaces the function rather than ``__main__.__file__``, which the training script,
    running meanwhile in the main thread, may read.
    """
    if _main_file_readable():
        yield
        return
    with _SPAWN_LOCK:
        prepare = spawn.get_preparation_data

        def without_unreadable_main(name: str) -> dict[str, Any]:
            data: dict[str, Any] = prepare(name)
            data.pop("init_main_from_path", None)
            return data

        spawn.get_preparation_data = without_unreadable_main
        try:
            yield
        finally:
            spawn.get_preparation_data = prepare


def _main_file_readable() -> bool:
    """Whether a spawned child can run the main script again: no script path (``python -c``, ``-m``),
    or one that names a file."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or getattr(main, "__spec__", None) is not None:
        return True
    original_dir = getattr(mp_process, "ORIGINAL_DIR", None) or ""  # where the spawn looks for a relative path
    return os.path.isfile(os.path.join(original_dir, path))


def _refuse_unspawnable_averagers(averagers: Sequence[Averager]) -> None:
    """Raises :class:`HookUsageError` for an average class that a sidecar could not import."""
    if _main_file_readable():
        return
    local = sorted({type(a).__name__ for a in averagers if type(a).__module__ == "__main__"})
    if local:
        raise HookUsageError(f"the average class {', '.join(local)} is defined in a script read from standard "
                             f"input, which the sidecar process cannot import; move it into a module (or run the "
                             f"script from a file)")


class WeightAveraging:
    """Keeps averages of a live model in a sidecar process (and SFA merge-backs in place)."""

    def __init__(
        self,
        model: torch.nn.Module,
        averages: Sequence[Averager | SFA],
        *,
        snapshot_every: int = 1,
        out_dir: str | Path = "averages",
        save_every: int | None = None,
        strict: bool = False,
        keep_last: int = 2,
        sidecar_device: str = "cpu",
        start_step: int = 0,
    ) -> None:
        if snapshot_every < 1:
            raise ValueError("snapshot_every must be at least 1")
        if keep_last < 1:
            # 0 would delete the save that `latest` points to, the one a resume and the user read.
            raise HookUsageError(f"keep_last must be at least 1 (the latest save is always kept), not {keep_last}")
        self.model = model
        self.sfa = _the_sfa(averages)
        self.averagers = [a for a in averages if isinstance(a, Averager)]
        labels = self.labels()
        if len(set(labels)) != len(labels):
            raise ValueError(f"two averages share a label: {labels}")
        self.snapshot_every = snapshot_every
        self.strict = strict
        self.out_dir = Path(out_dir)
        # FSDP/DTensor: every rank averages its own shard; otherwise (DDP) the ranks hold the same
        # weights and rank 0 alone snapshots.
        self.sharded = is_sharded(model)
        rank = _rank()
        sidecar_dir = shard_directory(self.out_dir, rank) if self.sharded else self.out_dir
        self.counts = SnapshotCounts()
        # A resumed run passes its global step; the sidecar restores the averages saved in out_dir.
        self.step_count = start_step
        self.active = self.sharded or rank == 0
        self._closed = False
        self._start_waited = False
        self._warned = False
        self._anchor: dict[str, torch.Tensor] | None = None
        self._task_step = 0
        self._merged_at: int | None = None  # the task step of the last merge-back
        self._swapped: str | None = None  # the label swapped in by swapped_in(), while its block runs
        self._pending: tuple[int, Any] | None = None  # (step, CUDA event) of a copy in flight
        self._requests = itertools.count()
        self._unstarted_restarts = 0  # restarts since a sidecar last ran (bounded by MAX_UNSTARTED_RESTARTS)
        self._settings = SidecarConfig(sidecar_dir, self.averagers, save_every, keep_last,
                                       None if self.sharded else _model_config(model), os.getpid(), sidecar_device)
        self._link: _SidecarLink | None = None
        # Only a process that runs a sidecar writes out_dir: it alone checks and locks it.
        self._lock = _claim_out_dir(sidecar_dir, self.averagers) if self.active and self.averagers else None
        try:
            if self.sharded and rank == 0:
                write_manifest(self.out_dir, model, _model_config(model))
            if self._lock is not None:
                self._start_sidecar(self._lock)
        except BaseException:
            self._release_lock()
            raise

    def _start_sidecar(self, lock: OutDirLock) -> None:
        """Binds the model's tensors, makes their shared buffers and spawns the sidecar (which shares ``lock``)."""
        _warn_about_lawa_memory(self.averagers, self.snapshot_every)
        self._tensors = _snapshot_tensors(self.model)
        self._bindings = {n: _binding(t) for n, t in self._tensors.items()}
        self._buffers = {n: _shared_like(t) for n, t in self._tensors.items()}
        self._stream = torch.cuda.Stream() if any(t.is_cuda for t in self._tensors.values()) else None
        self._settings.lock = lock
        self._link = _SidecarLink(self._settings, self._buffers)
        atexit.register(self.close)

    def _release_lock(self, *, unlock: bool = True) -> None:
        if self._lock is not None:
            self._lock.release(unlock=unlock)
            self._lock = None

    # -- the sidecar ------------------------------------------------------------------
    @property
    def _sidecar(self) -> _SidecarLink:
        if self._link is None:
            raise HookUsageError("no sidecar runs in this process: under DDP only rank 0 keeps averages, "
                                 "and a hook with SFA alone keeps none")
        return self._link

    def _revive(self) -> bool:
        """True when the sidecar runs; otherwise starts a new one from its last save and returns False.

        Never waits for the new one. A sidecar that died before it ran is restarted only when
        a signal killed it (the OOM killer, while it restored a large state), and only
        :data:`MAX_UNSTARTED_RESTARTS` times in a row; one that could not start (a bad
        ``out_dir``, a corrupt state) would fail the same way again: a :class:`SidecarError`
        carrying what it said.
        """
        link = self._sidecar
        if link.alive:
            return True
        if link.started.is_set():
            self._unstarted_restarts = 0
        else:
            self._refuse_restart(link)
        code = link.process.exitcode
        if not self._warned:
            warnings.warn("the averaging sidecar died; restarting it from its last saved state", stacklevel=3)
            self._warned = True
        logger.warning("the averaging sidecar ended (exit code %s); restarting it from the averages saved in %s",
                       code, self.out_dir)
        self.counts.sidecar_restarts += 1
        self._unstarted_restarts += 1
        self._pending = None
        self._relay_notices()
        link.close(flush=False)
        self._link = _SidecarLink(self._settings, self._buffers)
        return False

    def _refuse_restart(self, link: _SidecarLink) -> None:
        """Raises :class:`SidecarError` unless the sidecar, dead before it ran, is to be restarted."""
        code = link.process.exitcode
        if link.said is None and link.killed:
            if self._unstarted_restarts < MAX_UNSTARTED_RESTARTS:
                return
            raise SidecarError(f"the averaging sidecar was killed before it started (exit code {code}), "
                               f"{self._unstarted_restarts} restarts in a row; if the system ran out of memory "
                               f"while it restored the averages in {self.out_dir}, give it more or keep fewer "
                               f"LAWA snapshots")
        said = link.startup_error()
        raise SidecarError(f"the averaging sidecar exited before it started: {said or f'exit code {code}'}; "
                           f"see its log above, and fix or remove the averages in {self.out_dir}")

    def _request(self, kind: str, argument: Any, timeout: float, *, restart: bool = True) -> Any:
        """Sends a request and waits, in slices that check the sidecar lives, for its answer."""
        link = self._sidecar
        request = next(self._requests)
        link.commands.put((kind, request, argument))
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = link.reply(POLL_INTERVAL)  # keeps a report that it could not start for _revive
            except Exception as exc:  # the reply's shared tensors went with a dying sidecar
                if not link.alive:
                    raise self._died(kind, restart) from exc
                raise SidecarError(f"the averaging sidecar's answer to {kind!r} could not be read: {exc}") from exc
            if reply is None:
                if not link.alive:
                    raise self._died(kind, restart) from None
                if time.monotonic() >= deadline:
                    raise SidecarError(f"the averaging sidecar did not answer {kind!r} within {timeout:g} s; "
                                       f"it still runs (a very large model?): pass a longer timeout") from None
                continue
            status, answered, value = reply
            if answered == request:  # else: the late answer to a request given up on
                break
        self._relay_notices()  # the sidecar said them before this answer
        if status == "error":
            raise _reply_error(*value)
        return value

    def _died(self, kind: str, restart: bool) -> SidecarError:
        if not restart:
            said = self._sidecar.said
            return SidecarError(f"the averaging sidecar died before it answered {kind!r}"
                                f"{' (it could not start: ' + said + ')' if said else ''}; the averages in "
                                f"{self.out_dir} are those of its last save")
        self._revive()  # raises the sidecar's own error when it could not start
        return SidecarError(f"the averaging sidecar died before it answered {kind!r}; a new one is starting from "
                            f"the averages saved in {self.out_dir}: ask again once wait_until_ready() returns")

    def _await_free(self, timeout: float) -> bool:
        """Waits until the sidecar can take a snapshot, restarting it if it dies; False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self._sidecar.free.wait(POLL_INTERVAL):
            self._revive()
            if time.monotonic() >= deadline:
                return False
        return True

    # -- the training loop ---------------------------------------------------------------
    def step(self) -> None:
        """Call once per optimizer step; snapshots every ``snapshot_every`` steps."""
        self._refuse_inside_swap("step()")
        if self._closed:
            raise HookUsageError(f"step() after close(): the averages are final (saved in {self.out_dir}); build a "
                                 "new WeightAveraging with start_step= to go on")
        self.step_count += 1
        if self.sfa is not None:
            self._sfa_step(self.sfa)
        if self._link is None or self._closed:
            return
        self._relay_notices()
        self._hand_over_finished_copy()
        if self.step_count % self.snapshot_every:
            return
        self._revive()  # a new sidecar marks the buffers free once it runs; until then snapshots are skipped
        busy = self._pending is not None or not self._sidecar.free.is_set()
        if busy and not self._waited_for_start():
            if not self.strict:
                self.counts.skipped += 1
                return
            self._wait_for_sidecar()
        self._follow_replaced_tensors()
        self._sidecar.free.clear()
        self._copy_snapshot(self.step_count)
        self.counts.taken += 1

    def _waited_for_start(self) -> bool:
        """The first snapshot waits (once, bounded) for the sidecar to start: a short run would otherwise
        take none while the sidecar imports torch. True when the sidecar is then free."""
        if self.counts.taken or self._start_waited or self._pending is not None:
            return False
        self._start_waited = True
        return self._await_free(FIRST_SNAPSHOT_WAIT)

    def _follow_replaced_tensors(self) -> None:
        """Binds the snapshot to each tensor the model replaced since the last one (``param.data = t``, a new
        Parameter or module, ``load_state_dict(assign=True)``), so the average goes on with the live weights.

        Run on snapshot steps only, before the copy (no copy of a bound tensor is in flight then). It walks
        ``state_dict(keep_vars=True)`` and compares each tensor's pointer, shape, strides, dtype and device
        with the bound one's; nothing is copied. Measured: about 2 ms for the 291 tensors of a 32-layer Llama
        on a loaded CPU core, against a snapshot copy of the whole model. A tensor of another shape or dtype,
        or one that appeared or went, is a :class:`HookUsageError`: its average cannot go on.
        """
        live = _live_tensors(self.model)
        if live.keys() != self._bindings.keys():
            raise _changed_names_error(self._bindings.keys(), live.keys())
        replaced = [name for name, tensor in live.items() if _binding(tensor) != self._bindings[name]]
        if not replaced:
            return
        _refuse_reshaped({name: (self._tensors[name], live[name]) for name in replaced})
        for name in replaced:
            self._tensors[name] = live[name].detach()
            self._bindings[name] = _binding(live[name])
        if self._stream is None and any(live[name].is_cuda for name in replaced):
            self._stream = torch.cuda.Stream()  # moved to the GPU after the hook was made
        logger.debug("the snapshot follows %d replaced tensors (%s, ...)", len(replaced), replaced[0])

    def _relay_notices(self) -> None:
        """Shows what the sidecar said about its saves: a failed save as one warning, its recovery in the log."""
        link = self._link
        while link is not None and not link.notices.empty():  # empty(): the cheap test of every step()
            try:
                level, text = link.notices.get_nowait()
            except queue.Empty:  # another thread of the trainer took it
                return
            if level == "warning":
                warnings.warn(text, stacklevel=3)
            else:
                logger.info("%s", text)

    def _wait_for_sidecar(self) -> None:
        self._finish_pending_copy()
        if not self._await_free(FREE_TIMEOUT):
            raise SidecarError(f"the averaging sidecar did not take the previous snapshot within {FREE_TIMEOUT:g} s")

    def _copy_snapshot(self, step: int) -> None:
        with torch.no_grad():
            if self._stream is None:
                for name, tensor in self._tensors.items():
                    self._buffers[name].copy_(tensor)
                self._sidecar.commands.put(("snapshot", step))
                return
            main = torch.cuda.current_stream()
            self._stream.wait_stream(main)
            with torch.cuda.stream(self._stream):
                for name, tensor in self._tensors.items():
                    self._buffers[name].copy_(tensor, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._stream)
            # The next optimizer step must not overwrite weights being copied: the training
            # stream waits on the copy on the GPU; the host does not wait at all.
            main.wait_event(done)
            self._pending = (step, done)

    def _hand_over_finished_copy(self) -> None:
        if self._pending is not None and self._pending[1].query():
            self._sidecar.commands.put(("snapshot", self._pending[0]))
            self._pending = None

    def _finish_pending_copy(self) -> None:
        if self._pending is not None:
            self._pending[1].synchronize()
            self._hand_over_finished_copy()

    # -- SFA ---------------------------------------------------------------------------------
    def start_task(self) -> None:
        """Takes theta_o, the model at the start of a task, into (pinned) host memory."""
        if self.sfa is None:
            raise HookUsageError("start_task() needs SFA(...) among the averages given to WeightAveraging")
        self._refuse_inside_swap("start_task()")
        self._anchor = {n: _host_copy(t) for n, t in _snapshot_tensors(self.model).items()
                        if t.is_floating_point()}
        self._task_step = 0
        self._merged_at = None

    def end_task(self) -> None:
        """The end-of-task merge-back (none if the task's last step just merged)."""
        if self._merged_at != self._task_step:
            self.merge_back()

    def _sfa_step(self, sfa: SFA) -> None:
        self._task_step += 1
        every = sfa.every
        if self._anchor is not None and every and self._task_step % every == 0:
            self.merge_back()

    def merge_back(self) -> None:
        """theta <- (1 - beta) theta + beta theta_o, in place, in chunks (no model copy on the GPU)."""
        if self.sfa is None:
            raise HookUsageError("merge_back() needs SFA(...) among the averages given to WeightAveraging")
        if self._anchor is None:
            raise HookUsageError("call start_task() first: it takes theta_o, the model the merge-back pulls toward")
        self._refuse_inside_swap("merge_back()")
        check_beta(self.sfa.beta)  # once here: the pull itself trusts its beta
        with torch.no_grad():
            for name, live in _snapshot_tensors(self.model).items():
                anchor = self._anchor.get(name)
                if anchor is not None:
                    _pull_in_chunks(live, anchor, self.sfa.beta)
        self._merged_at = self._task_step
        if self.sfa.rolling:
            self.start_task()

    # -- results ------------------------------------------------------------------------------
    def averaged_state_dict(self, label: str, *, timeout: float = REPLY_TIMEOUT) -> dict[str, torch.Tensor]:
        """The current float32 average ``label`` (e.g. ``"ema_0.999"``), without touching the model.

        Raises :class:`UnknownAverageError` for a label this hook does not keep,
        :class:`HookUsageError` for an average that holds no snapshot yet, and
        :class:`SidecarError` when the sidecar dies or does not answer within ``timeout`` seconds.
        """
        self._check_label(label)
        if self._closed:
            raise HookUsageError(f"averaged_state_dict() after close(): read the averages saved in {self.out_dir}")
        if not self._revive():
            raise SidecarError(f"the averaging sidecar had died; a new one is starting from the averages saved in "
                               f"{self.out_dir}: ask again once wait_until_ready() returns")
        self._finish_pending_copy()
        value: dict[str, torch.Tensor] = self._request("average", label, timeout)
        return value

    @contextmanager
    def swapped_in(self, label: str, *, timeout: float = REPLY_TIMEOUT) -> Iterator[None]:
        """Runs the ``with`` block with the average ``label`` in the live model; restores it bit for bit after.

        Parameters and floating buffers get the average cast to their own dtype and device, copied
        a chunk at a time (no float32 copy of the model on the GPU); integer buffers
        (``num_batches_tracked``) keep their values. The training weights wait in host memory (pinned
        for CUDA tensors) and are copied back when the block ends, also when it raises. ``step()``
        inside the block is refused: it would average the average. Needs this process's sidecar: under
        DDP only rank 0 has the average and nothing is broadcast, so evaluate with it on rank 0 alone.

        Raises what :meth:`averaged_state_dict` raises, and :class:`HookUsageError` inside another
        swap, after :meth:`close` and in a process that runs no sidecar.
        """
        self._check_label(label)
        self._refuse_swap(label)
        live = {n: t for n, t in _snapshot_tensors(self.model).items() if t.is_floating_point()}
        average = self.averaged_state_dict(label, timeout=timeout)
        _check_average_fits(average, live, label)
        training = {n: _host_copy(t) for n, t in live.items()}
        self._swapped = label
        try:
            _load(live, average)
            del average  # its host memory is not needed while the block runs
            yield
        finally:
            _load(live, training)
            self._swapped = None

    def _check_label(self, label: str) -> None:
        if label not in self.labels():
            kept = ", ".join(self.labels()) or "none (SFA changes the model itself)"
            raise UnknownAverageError(f"no average named {label!r}; this hook keeps: {kept}")

    def _refuse_swap(self, label: str) -> None:
        """Raises :class:`HookUsageError` when ``swapped_in(label)`` cannot run now."""
        if self._swapped is not None:
            raise HookUsageError(f"swapped_in({label!r}) inside swapped_in({self._swapped!r}): leave the first "
                                 f"block before swapping in another average")
        if self._closed:
            raise HookUsageError(f"swapped_in({label!r}) after close(): no sidecar holds the average any more; "
                                 f"load it from {self.out_dir}")
        if self._link is None:
            raise HookUsageError(f"swapped_in({label!r}) in a process that keeps no averages: under DDP only rank 0 "
                                 f"has them (nothing is broadcast), so evaluate with the average on rank 0 alone")

    def _refuse_inside_swap(self, call: str) -> None:
        if self._swapped is not None:
            raise HookUsageError(f"{call} inside swapped_in({self._swapped!r}): the model holds the average, not the "
                                 f"training weights; call it after the with-block")

    def wait_until_ready(self, timeout: float = 120.0) -> bool:
        """Blocks until the sidecar runs and can take a snapshot (the hook itself never waits)."""
        if self._link is None:
            return True
        if self._closed:
            raise HookUsageError("wait_until_ready() after close(): no sidecar runs any more")
        return self._await_free(timeout)

    def labels(self) -> list[str]:
        return [a.label for a in self.averagers]

    def close(self) -> SnapshotCounts:
        """Hands over the last snapshot, writes the final averages and stops the sidecar. Idempotent."""
        if self._closed:
            return self.counts
        self._closed = True
        link = self._link
        if link is None:
            return self.counts
        atexit.unregister(self.close)
        self._finish_pending_copy()
        saved = False
        if link.alive:
            try:
                self._request("close", None, CLOSE_TIMEOUT, restart=False)
                saved = True
            except SidecarError as exc:
                logger.warning("%s", exc)
            link.join(JOIN_TIMEOUT)
        else:
            logger.warning("the averaging sidecar is not running; the averages in %s are those of its last save",
                           self.out_dir)
        # Flushing waits for the pipe to drain: only a sidecar that answered has read everything.
        link.close(flush=saved)
        self._relay_notices()
        # After the sidecar's last save a next hook may use out_dir; a sidecar still alive past the
        # wait keeps its share of the lock, so no second hook writes beside its save.
        self._release_lock(unlock=not link.alive)
        logger.info("snapshots taken %d, skipped %d", self.counts.taken, self.counts.skipped)
        return self.counts

    def __enter__(self) -> WeightAveraging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _the_sfa(averages: Sequence[Averager | SFA]) -> SFA | None:
    for average in averages:
        if not isinstance(average, Averager | SFA):
            raise TypeError(f"{average!r} is neither an average (EMA, SWA, LAWA, ...) nor SFA")
    found = [a for a in averages if isinstance(a, SFA)]
    if len(found) > 1:
        raise ValueError("give at most one SFA: it changes the model itself")
    return found[0] if found else None


def _warn_about_lawa_memory(averagers: Sequence[Averager], snapshot_every: int) -> None:
    for averager in averagers:
        if isinstance(averager, LAWA) and averager.nu > snapshot_every:
            copies = (averager.k - 1) * math.ceil(averager.nu / snapshot_every) + 1
            logger.warning("%s keeps about %d float32 copies of the model with snapshot_every=%d; "
                           "snapshot_every=%d keeps %d", averager.label, copies, snapshot_every, averager.nu,
                           averager.k)


def _reply_error(kind: str, message: str) -> Exception:
    """The caller's error for an error the sidecar answered with."""
    if kind == UnknownAverageError.__name__:
        return UnknownAverageError(message)
    if kind == HookUsageError.__name__:
        return HookUsageError(message)
    return SidecarError(f"the averaging sidecar failed: {kind}: {message}")


def _pull_in_chunks(live: torch.Tensor, anchor: torch.Tensor, beta: float) -> None:
    """:func:`sfa_pull` of ``live`` toward the host tensor ``anchor``, in place, a chunk at a time.

    The only GPU scratch is the anchor's chunk on its way in: the pull writes into ``live``.
    """
    for part, theta_o in _device_chunks(live, anchor):
        sfa_pull(part, theta_o, beta, out=part)


def _device_chunks(live: torch.Tensor, source: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs of a chunk of ``live`` (a view to write through) and the same chunk of ``source`` on live's device.

    ``source`` keeps its dtype: a float32 chunk of :data:`SFA_CHUNK` elements is the only scratch on the
    device. A tensor not contiguous in the standard layout (a channels-last convolution) has no flat view,
    so it comes whole.
    """
    if not live.is_contiguous():
        yield live, source.to(live.device)
        return
    flat_live, flat_source = live.view(-1), source.reshape(-1)
    for start in range(0, flat_live.numel(), SFA_CHUNK):
        yield flat_live[start:start + SFA_CHUNK], flat_source[start:start + SFA_CHUNK].to(live.device,
                                                                                         non_blocking=True)


def _load(live: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Copies each of ``values`` into the live tensor of its name, cast to that tensor's dtype, in chunks."""
    with torch.no_grad():
        for name, tensor in live.items():
            for part, chunk in _device_chunks(tensor, values[name]):
                part.copy_(chunk)


def _check_average_fits(average: dict[str, torch.Tensor], live: dict[str, torch.Tensor], label: str) -> None:
    """Raises :class:`HookUsageError` before the swap touches anything when the average lacks a tensor or
    has another shape (the model changed since the hook was made)."""
    for name, tensor in live.items():
        value = average.get(name)
        if value is None or value.shape != tensor.shape:
            found = "no such tensor" if value is None else f"shape {tuple(value.shape)}"
            raise HookUsageError(f"the average {label!r} does not fit the model: tensor {name!r} has shape "
                                 f"{tuple(tensor.shape)}, the average {found}; make a new WeightAveraging for a "
                                 f"changed model")


def _snapshot_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state-dict name (detached, live storage; local shards)."""
    return {name: tensor.detach() for name, tensor in _live_tensors(model).items()}


def _live_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state-dict name, as the model holds them now (local shards)."""
    return {name: local_tensor(tensor) for name, tensor in model.state_dict(keep_vars=True).items()}


# What the snapshot copies from, for one tensor: (data pointer, shape, strides, dtype, device).
Binding = tuple[int, torch.Size, tuple[int, ...], torch.dtype, torch.device]


def _binding(tensor: torch.Tensor) -> Binding:
    """What changes when the model replaces a tensor: a bound tensor keeps its storage alive, so an
    equal pointer with an equal layout is the same memory."""
    return tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype, tensor.device


def _changed_names_error(bound: Iterable[str], live: Iterable[str]) -> HookUsageError:
    new, gone = sorted(set(live) - set(bound)), sorted(set(bound) - set(live))
    parts = [f"{label}: {_first_few([repr(n) for n in names])}" for label, names in (("new", new), ("gone", gone))
             if names]
    return HookUsageError(f"the model's tensors changed since the hook was made ({'; '.join(parts)}): the "
                          f"averages hold the tensors it had then; {CHANGED_MODEL_FIX}")


def _refuse_reshaped(replaced: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Raises :class:`HookUsageError` naming each (bound, live) pair of another shape or dtype."""
    changes = []
    for name, (bound, live) in replaced.items():
        if bound.shape != live.shape:
            changes.append(f"{name!r} changed its shape from {tuple(bound.shape)} to {tuple(live.shape)}")
        elif bound.dtype != live.dtype:
            changes.append(f"{name!r} changed its dtype from {bound.dtype} to {live.dtype}")
    if changes:
        raise HookUsageError(f"since the hook was made, {_first_few(changes, '; ')}: averages of another shape or "
                             f"dtype cannot go on; {CHANGED_MODEL_FIX}")


def _first_few(items: list[str], separator: str = ", ") -> str:
    """The first :data:`MAX_NAMED` of ``items``, and how many more (a resized model changes many tensors)."""
    more = f" and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else ""
    return separator.join(items[:MAX_NAMED]) + more


def _claim_out_dir(directory: Path, averagers: Sequence[Averager]) -> OutDirLock:
    """Checks what the sidecar will need before it is spawned, and takes ``directory`` for this hook."""
    _refuse_unspawnable_averagers(averagers)
    prepare_out_dir(directory)
    return OutDirLock.claim(directory)


def _shared_like(tensor: torch.Tensor) -> torch.Tensor:
    """A host buffer in shared memory for snapshots of ``tensor`` (page-locked for CUDA tensors)."""
    buffer = torch.empty(tensor.shape, dtype=tensor.dtype).share_memory_()
    if tensor.is_cuda and buffer.numel():
        # Page-locking the shared pages lets the device-to-host copy run asynchronously.
        torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel() * buffer.element_size(), 0)
    return buffer


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
    copy.copy_(tensor)
    return copy


def _model_config(model: torch.nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if callable(to_dict) else None


__all__ = ["SFA", "SnapshotCounts", "WeightAveraging"]
