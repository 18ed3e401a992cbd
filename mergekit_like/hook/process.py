"""What the sidecar process needs of the operating system: a flag two processes share, its signals, its name.

:class:`SharedFlag` replaces ``multiprocessing.Event`` between the trainer and the sidecar.
An Event wakes its waiters through a Condition whose ``notify`` waits until each sleeper has
said it woke; a trainer killed (SIGKILL) while it waits in ``Event.wait`` never says so, and the
sidecar's next ``Event.set`` blocks forever: it never saves and never exits. The flag is one
integer in shared memory, written and read without a lock, and waited for by polling.

Signals: Ctrl-C sends SIGINT to the whole process group, sidecar included. The trainer decides
what an interrupt means (its ``close()`` asks the sidecar for the last save), so the sidecar
ignores SIGINT. SIGTERM (a scheduler's stop, ``timeout``) ends the trainer without its
``close()``, so the sidecar takes it as the order to save and exit. Both are blocked from the
spawn until the handlers are in place: one that came while the sidecar imported torch would
otherwise kill it unsaved.
"""

from __future__ import annotations

import ctypes
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mergekit_like.io import libc

# Polling a SharedFlag starts this often and slows down to WAIT_SLICE_MOST. Measured between two
# processes on a loaded 2-core machine: a set flag is seen at most 1 ms late (median 0.4-0.6 ms) for
# folds of 0.5 to 200 ms; with 5 ms as the slowest slice, up to 5 ms late after a 200 ms fold. A wait
# wakes at most 1000 times a second, a cost no profile of the trainer shows.
WAIT_SLICE_FIRST = 0.0002
WAIT_SLICE_MOST = 0.001
# The signals held back between the spawn and the sidecar's handlers.
HELD_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
# The sidecar's name in ps, top and pgrep (Linux keeps 15 characters of it).
PROCESS_NAME = b"mkl-sidecar"
PR_SET_NAME = 15


class SharedFlag:
    """A set-or-clear flag in shared memory; unlike ``multiprocessing.Event``, no process that dies
    while it waits can block the others."""

    def __init__(self, context: Any) -> None:
        # RawValue: no lock, which is the point; an aligned int is read and written whole.
        self._value = context.RawValue(ctypes.c_int, 0)

    def set(self) -> None:
        self._value.value = 1

    def clear(self) -> None:
        self._value.value = 0

    def is_set(self) -> bool:
        return bool(self._value.value)

    def wait(self, timeout: float) -> bool:
        """Whether the flag is set within ``timeout`` seconds (polled, never blocked on another process)."""
        deadline = time.monotonic() + timeout
        pause = WAIT_SLICE_FIRST
        while not self.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(pause, left))
            pause = min(pause * 2, WAIT_SLICE_MOST)
        return True


@contextmanager
def signals_held() -> Iterator[None]:
    """Blocks SIGINT and SIGTERM in the calling thread while the block runs: a process spawned in it
    starts with them blocked (the mask passes through fork and exec) until :func:`take_signals`."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


class StopRequest:
    """Whether the sidecar was told, by SIGTERM, to save and exit."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def _received(self, number: int, _frame: Any) -> None:
        self.signal = number


def take_signals() -> StopRequest:
    """In the sidecar: ignores SIGINT, turns SIGTERM into a :class:`StopRequest`, then lets both in.

    A signal that arrived while they were held is delivered now, to these handlers.
    """
    stop = StopRequest()
    if threading.current_thread() is threading.main_thread():  # an in-process sidecar (tests) keeps its signals
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, stop._received)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
    return stop


def name_process() -> None:
    """Names the sidecar ``mkl-sidecar`` for ps, top and ``pgrep mkl-sidecar`` (Linux; elsewhere nothing)."""
    prctl = libc.prctl()
    if prctl is not None:
        prctl(PR_SET_NAME, PROCESS_NAME, 0, 0, 0)
