"""The trainer's end of one sidecar process: spawning it, its channels, reading its answers whole."""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing import process as mp_process
from multiprocessing import spawn
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
import torch.multiprocessing as mp

from mergekit_like.averaging.base import Averager
from mergekit_like.errors import HookUsageError
from mergekit_like.hook.process import SharedFlag, signals_held
from mergekit_like.hook.sidecar import SAVED, ReplyPipe, SidecarConfig, run_sidecar

# Every wait is cut into slices this long, between checks that the sidecar still runs.
POLL_INTERVAL = 0.1
# How long close() waits, once the sidecar has exited, for the reader of its answers to find the pipe's end.
READER_JOIN_TIMEOUT = 5.0


class SidecarLink:
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
        # The step of the averages last saved, as the sidecar says after each save and at start (None: none).
        self.saved: int | None = None
        self.said_saved = threading.Event()  # set once the sidecar has said which step it restored
        self._reader = threading.Thread(target=self._read_answers, args=(receiving,),
                                        name="mergekit-like-sidecar-replies", daemon=True)
        self._reader.start()
        self.free = SharedFlag(context)  # set by the sidecar when the buffers may be written: at start, after a fold
        self.started = SharedFlag(context)  # set once, when it has restored its state and runs
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
            with spawnable_main(), signals_held():  # the sidecar takes SIGINT and SIGTERM itself once it runs
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

    def _read_answers(self, pipe: Connection) -> None:
        """Moves each whole message of the sidecar's reply pipe onto :attr:`answers` (notices onto
        :attr:`notices`, the step of each save into :attr:`saved`) until the pipe ends."""
        try:
            while True:
                try:
                    data = pipe.recv_bytes()
                except (EOFError, OSError):  # the sidecar is gone (perhaps halfway through a message)
                    return
                try:
                    message = ForkingPickler.loads(data)
                except Exception as exc:  # e.g. the shared tensors of an answer went with a dying sidecar
                    self.answers.put(exc)
                    continue
                if message[0] != "notice":
                    self.answers.put(message)
                elif message[2][0] == SAVED:
                    self.saved = int(message[2][1]) if message[2][1] else None
                    self.said_saved.set()
                else:  # answers no request: the trainer shows it at its next step()
                    self.notices.put(message[2])
        finally:
            pipe.close()


# Held while a sidecar is spawned with the stand-in of spawn.get_preparation_data (one at a time).
_SPAWN_LOCK = threading.Lock()


@contextmanager
def spawnable_main() -> Iterator[None]:
    """Lets a sidecar be spawned from a main script that cannot be read again (``python - < train.py``).

    The spawn start method re-runs the parent's ``__main__`` in the child from ``__main__.__file__``;
    for a script read from standard input that is ``'<stdin>'``, and the child dies of a
    FileNotFoundError before it runs. The sidecar needs nothing of the parent's main script (its
    target lives in this package; :func:`refuse_unspawnable_averagers` refuses averages defined
    there), so while the spawn prepares the child the path is left out, as for ``python -c``. The
    stand-in replaces the function rather than ``__main__.__file__``, which the training script,
    running meanwhile in the main thread, may read.
    """
    if main_file_readable():
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


def main_file_readable() -> bool:
    """Whether a spawned child can run the main script again: no script path (``python -c``, ``-m``),
    or one that names a file."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or getattr(main, "__spec__", None) is not None:
        return True
    original_dir = getattr(mp_process, "ORIGINAL_DIR", None) or ""  # where the spawn looks for a relative path
    return os.path.isfile(os.path.join(original_dir, path))


def refuse_unspawnable_averagers(averagers: Sequence[Averager]) -> None:
    """Raises :class:`HookUsageError` for an average class that a sidecar could not import."""
    if main_file_readable():
        return
    local = sorted({type(a).__name__ for a in averagers if type(a).__module__ == "__main__"})
    if local:
        raise HookUsageError(f"the average class {', '.join(local)} is defined in a script read from standard "
                             f"input, which the sidecar process cannot import; move it into a module (or run the "
                             f"script from a file)")
