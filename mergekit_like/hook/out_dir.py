"""``out_dir`` of the training hook: checked when the hook is made, and locked for one hook at a time.

:class:`OutDirLock` holds ``out_dir/.hook.lock`` for the trainer, and the sidecar inherits
the same lock, so it stays taken while an orphaned sidecar still saves.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import tempfile
from multiprocessing import reduction
from pathlib import Path
from typing import Any

from mergekit_like.errors import HookUsageError, OutputLockedError
from mergekit_like.io.atomic import pid_alive

logger = logging.getLogger(__name__)

# The file in out_dir whose lock says which hook keeps its averages there.
LOCK_FILE = ".hook.lock"
# What flock raises where the filesystem keeps no locks (some network filesystems).
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


class OutDirLock:
    """``out_dir/.hook.lock``, locked (``flock``) while a hook keeps its averages in ``out_dir``.

    The lock belongs to an open file, not to a process: the kernel drops it when the last
    process holding that file ends, so the lock of a killed run is free again without any
    clean-up. Pickled into a spawned sidecar the same open file goes along (as a
    multiprocessing heap arena's does), so the lock lasts while an orphaned sidecar saves.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd: int | None = fd

    @classmethod
    def claim(cls, directory: Path) -> OutDirLock:
        """Takes the lock of ``directory`` (which exists), or raises :class:`OutputLockedError` naming its holder."""
        path = directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _locked_error(directory, path) from None
        except OSError as exc:  # a filesystem without locks: the hook still runs, unguarded
            if exc.errno not in NO_LOCKS:
                os.close(fd)
                raise
            logger.warning("%s cannot be locked (%s): a second hook on this out_dir would not be refused",
                           path, exc.strerror)
        os.ftruncate(fd, 0)  # the holder's pid, for the message of a hook refused
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(path, fd)

    def release(self, *, unlock: bool = True) -> None:
        """Lets go of the lock. ``unlock`` unlocks for every process sharing it; without it only this
        process's descriptor is closed, and a sidecar still running keeps out_dir locked until it exits."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                if unlock:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __reduce__(self) -> tuple[Any, ...]:
        if self.fd is None:
            raise ValueError(f"the lock of {self.path} was released")
        return _inherited_lock, (self.path, reduction.DupFd(self.fd))


def _inherited_lock(path: Path, duplicate: Any) -> OutDirLock:
    """The lock in the sidecar: the trainer's open file, duplicated into it at spawn."""
    return OutDirLock(path, duplicate.detach())


def _locked_error(directory: Path, path: Path) -> OutputLockedError:
    try:
        holder = int(path.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        holder = None
    if holder is None:
        who = "another WeightAveraging"
    elif pid_alive(holder):
        who = f"another WeightAveraging (process {holder})"
    else:
        who = f"the sidecar of a WeightAveraging whose process {holder} has ended (it saves, then exits)"
    return OutputLockedError(f"{who} keeps its averages here now", path=directory,
                             fix=f"give this hook another out_dir, or close the other hook first "
                                 f"(the lock is {LOCK_FILE}; it frees itself when its holder ends)")


def prepare_out_dir(directory: Path) -> None:
    """Creates ``directory`` and checks that it takes new files; :class:`HookUsageError` in one line otherwise.

    A directory is created for each save, so a probe directory is what this tries.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".hook-probe-", dir=directory))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename not in (None, str(directory)) else ""
        raise HookUsageError(f"out_dir {directory} cannot hold the averages: {reason}{where}; give an out_dir "
                             f"that the training process can create and write") from None
