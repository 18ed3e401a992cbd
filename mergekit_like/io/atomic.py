"""Atomic output directories: all of the output appears at once, or none of it.

Output is written into a hidden temporary directory beside the target
(same filesystem, so the final step is a rename), fsynced, and renamed into
place only when complete. An existing target is replaced only after the new
output is complete; an exception, Ctrl-C or a full disk removes the
temporary directory and leaves the old target untouched. A temporary left by
a killed run (SIGKILL cannot be caught) is removed by the next run into the
same target once its owning process is gone; a previous output that a killed
run had moved aside is put back instead, never removed.

Replacing a target swaps the two directories with one ``renameat2(RENAME_EXCHANGE)``
where the kernel and filesystem support it, so the target never disappears;
elsewhere two renames leave a moment without a target, which recovery covers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mergekit_like.errors import (
    MergekitLikeError,
    OutputExistsError,
    OutputLockedError,
    OutputWriteError,
    from_os_error,
    os_error_path,
    os_error_words,
)
from mergekit_like.io import libc

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
    """Puts back an output a killed run had moved aside, then removes the rest it left."""
    stale = stale_temporaries(target)
    backups = [p for p in stale if p.name.startswith(f".{target.name}{OLD_MARK}")]
    if backups and _absent_or_empty(target):
        # Killed between moving the old output aside and moving the new one in: the
        # backup is the last complete output (removal first renames it to a temporary).
        restored = max(backups, key=lambda p: p.stat().st_ctime)
        os.rename(restored, target)
        logger.warning("restored %s from %s, moved aside by an interrupted run", target, restored.name)
        stale.remove(restored)
    for path in stale:
        logger.warning("removing %s, left by an interrupted run", path)
        shutil.rmtree(path, ignore_errors=True)


def _absent_or_empty(target: Path) -> bool:
    # An empty directory may have been made since the kill (mkdir -p); it holds nothing to keep.
    if target.is_symlink():
        return False
    if not target.exists():
        return True
    return target.is_dir() and not any(target.iterdir())


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

    Any OSError about the output (its parent, lock, temporary, files, renames) becomes an
    :class:`OutputWriteError` naming the path; one about another file (an input read by the
    block) passes through unchanged. Either way nothing is left behind.

    >>> with atomic_directory("out") as tmp:   # doctest: +SKIP
    ...     (tmp / "model.safetensors").write_bytes(data)
    """
    target = Path(target).absolute()
    with _output_errors(target):
        check_target(target, overwrite=overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target), _spare_descriptors() as spare:
        with _output_errors(target):
            _remove_stale(target)
            check_target(target, overwrite=overwrite)  # a restored previous output counts
            temp = _temp_name(target, TEMP_MARK)
            temp.mkdir()
        try:
            with _block_errors(target, temp):
                yield temp
            with _output_errors(target):
                fsync_tree(temp)
                _move_into_place(temp, target, overwrite)
        except BaseException:
            spare.release()  # a block that ran out of descriptors leaves none to remove the temporary with
            _remove_temporary(temp)
            raise


OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def output_write_error(exc: OSError, target: Path) -> OutputWriteError:
    """``exc``, raised while writing ``target``, as one line naming the path and what to do."""
    where = os_error_path(exc) or target
    if exc.errno in OUT_OF_SPACE and exc.errno != errno.EFBIG:  # a size limit is not cured by free space
        fix = f"free space on the device holding {target.parent} or write the output elsewhere"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        fix = f"make {where.parent} writable for this user, or write the output elsewhere"
    elif exc.errno == errno.EROFS:
        fix = "write the output to a writable file system"
    else:
        fix = os_error_words(exc)[1] or "check the output path, then run again"
    return from_os_error(exc, OutputWriteError, path=where, fix=f"{fix}; nothing partial was kept")


@contextmanager
def _output_errors(target: Path) -> Iterator[None]:
    """Turns any OSError of the output's own steps (lock, temporary, fsync, renames) into one clear error."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, MergekitLikeError):
            raise
        raise output_write_error(exc, target) from exc


@contextmanager
def _block_errors(target: Path, temp: Path) -> Iterator[None]:
    """Turns an OSError of the caller's block into an output error where it is about the output.

    A full disk always is (it is writing that fills it). Other errors count where they name
    the output; one naming an input, or nothing, is the caller's to describe. The shard writer
    names its own file and tensor.
    """
    try:
        yield
    except OSError as exc:
        if isinstance(exc, MergekitLikeError) or not (exc.errno in OUT_OF_SPACE or _names_output(exc, target, temp)):
            raise
        raise output_write_error(exc, target) from exc


def _names_output(exc: OSError, target: Path, temp: Path) -> bool:
    named = [Path(os.fsdecode(n)).absolute() for n in (exc.filename, exc.filename2)
             if isinstance(n, (str, bytes, os.PathLike))]
    return any(path == target.parent or _within(path, temp) or _within(path, target) for path in named)


def _within(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


# Descriptors held back while the block runs. A block that fails for want of descriptors (EMFILE,
# inputs still open) leaves none for removing the temporary (rmtree opens each directory it empties),
# so these are closed first.
SPARE_DESCRIPTORS = 8


class _Spare:
    """Open descriptors to /dev/null, closed on release (or when the block ends)."""

    def __init__(self, fds: list[int]) -> None:
        self.fds = fds

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


@contextmanager
def _spare_descriptors() -> Iterator[_Spare]:
    fds: list[int] = []
    with contextlib.suppress(OSError):  # already short of descriptors: keep what could be had
        for _ in range(SPARE_DESCRIPTORS):
            fds.append(os.open(os.devnull, os.O_RDONLY))
    spare = _Spare(fds)
    try:
        yield spare
    finally:
        spare.release()


def _remove_temporary(temp: Path) -> None:
    """Removes a failed run's temporary; what cannot be removed now, the next run into the target removes."""
    shutil.rmtree(temp, ignore_errors=True)
    if temp.exists():
        logger.warning("could not remove %s; the next run into this output removes it", temp)


LOCK_MARK = ".lock"


@contextmanager
def _exclusive(target: Path) -> Iterator[None]:
    """Holds ``.NAME.lock`` beside the target: a second run into the same target is refused."""
    lock_path = target.parent / f".{target.name}{LOCK_MARK}"
    while True:
        with _output_errors(target):
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
    """Renames ``temp`` to ``target``; an old target ends up at ``temp``, then is removed."""
    check_target(target, overwrite=overwrite)  # it may have appeared while we worked
    if not target.exists():
        os.rename(temp, target)
    elif not _exchange(temp, target):
        _swap_by_two_renames(temp, target)
    fsync_dir(target.parent)
    shutil.rmtree(temp, ignore_errors=True)


def _swap_by_two_renames(temp: Path, target: Path) -> None:
    """Swaps the directories where RENAME_EXCHANGE is missing; a kill between the first two
    renames leaves the old output as ``.NAME.old-PID-*``, which the next run restores."""
    old = _temp_name(target, OLD_MARK)
    moved_aside = False
    try:
        os.rename(target, old)
        moved_aside = True
        os.rename(temp, target)
    except BaseException:  # Ctrl-C included: put the old output back at once
        if moved_aside:
            os.rename(old, target)
        raise
    # Renamed to a temporary before removal, so a kill during the removal never
    # leaves a half-deleted backup that recovery would mistake for a whole output.
    os.rename(old, temp)


AT_FDCWD = -100
RENAME_EXCHANGE = 2
# Kernel or filesystem without RENAME_EXCHANGE: fall back to two renames.
EXCHANGE_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two existing paths; False where the system cannot."""
    renameat2 = libc.renameat2()
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = libc.errno()
    if code in EXCHANGE_UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))
