"""Atomic output directories: all of the output appears at once, or none of it.

Output is written into a hidden temporary directory beside the target
(same filesystem, so the final step is a rename), fsynced, and renamed into
place only when complete. An existing target is replaced only after the new
output is complete; an exception, Ctrl-C or a full disk removes the
temporary directory and leaves the old target untouched. A temporary left by
a killed run (SIGKILL cannot be caught) is removed by the next run into the
same target once its owning process is gone.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mergekit_like.errors import OutputExistsError, OutputLockedError, OutputWriteError

logger = logging.getLogger(__name__)

TEMP_MARK = ".tmp-"
OLD_MARK = ".old-"


def check_target(target: str | Path, *, overwrite: bool) -> None:
    """Raises early (before any work) if writing to ``target`` would be refused."""
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise OutputExistsError(
            "exists and is not a directory", path=target, fix="choose another output path"
        )
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputExistsError(
            "exists and is not empty", path=target,
            fix="choose another output directory, or pass --overwrite to replace it once the new output is complete",
        )


def _temp_name(target: Path, mark: str) -> Path:
    return target.parent / f".{target.name}{mark}{os.getpid()}-{secrets.token_hex(4)}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temporaries(target: str | Path) -> list[Path]:
    """Temporaries of earlier runs into ``target`` whose process no longer runs."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    stale = []
    for mark in (TEMP_MARK, OLD_MARK):
        prefix = f".{target.name}{mark}"
        for candidate in target.parent.iterdir():
            if not candidate.name.startswith(prefix):
                continue
            pid_text = candidate.name[len(prefix):].split("-", 1)[0]
            if pid_text.isdigit() and not pid_alive(int(pid_text)):
                stale.append(candidate)
    return stale


def _remove_stale(target: Path) -> None:
    for path in stale_temporaries(target):
        logger.warning("removing %s, left by an interrupted run", path)
        shutil.rmtree(path, ignore_errors=True)


def fsync_tree(root: Path) -> None:
    """Flushes every file and directory under ``root`` to disk."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory; on clean exit it becomes ``target``.

    >>> with atomic_directory("out") as tmp:   # doctest: +SKIP
    ...     (tmp / "model.safetensors").write_bytes(data)
    """
    target = Path(target).absolute()
    check_target(target, overwrite=overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(f"cannot create the parent directory ({exc.strerror})", path=target.parent) from exc
    with _exclusive(target):
        _remove_stale(target)
        temp = _temp_name(target, TEMP_MARK)
        temp.mkdir()
        try:
            yield temp
            fsync_tree(temp)
            _move_into_place(temp, target, overwrite)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise


LOCK_MARK = ".lock"


@contextmanager
def _exclusive(target: Path) -> Iterator[None]:
    """Holds ``.NAME.lock`` beside the target: a second run into the same target is refused."""
    lock_path = target.parent / f".{target.name}{LOCK_MARK}"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputLockedError(
                "another run is writing this output now", path=target,
                fix=f"wait for it to finish, or choose another output (lock: {lock_path.name})",
            ) from None
        # The holder before us may have removed the file after we opened it: lock the current one.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(lock_path)
        finally:
            os.close(fd)


def _move_into_place(temp: Path, target: Path, overwrite: bool) -> None:
    check_target(target, overwrite=overwrite)  # it may have appeared while we worked
    old = None
    if target.exists():
        old = _temp_name(target, OLD_MARK)
        os.rename(target, old)
    try:
        os.rename(temp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
