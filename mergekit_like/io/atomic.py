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

import errno
import fcntl
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mergekit_like.errors import OutputExistsError, OutputLockedError, OutputWriteError
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

    >>> with atomic_directory("out") as tmp:   # doctest: +SKIP
    ...     (tmp / "model.safetensors").write_bytes(data)
    """
    target = Path(target).absolute()
    check_target(target, overwrite=overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(f"cannot create the parent directory ({exc.strerror})", path=target.parent) from exc
    with _no_space_is_a_write_error(target), _exclusive(target):
        _remove_stale(target)
        check_target(target, overwrite=overwrite)  # a restored previous output counts
        temp = _temp_name(target, TEMP_MARK)
        temp.mkdir()
        try:
            yield temp
            fsync_tree(temp)
            _move_into_place(temp, target, overwrite)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise


OUT_OF_SPACE = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "no space left on device (disk quota exceeded)",
    errno.EFBIG: "no space left on device for a file this large (file size limit exceeded)",
}


@contextmanager
def _no_space_is_a_write_error(target: Path) -> Iterator[None]:
    """Turns a full disk anywhere in a run (side files, manifest, fsync, rename) into one clear error.

    The shard writer names its own file and tensor; this catches what it does not see.
    """
    try:
        yield
    except OSError as exc:
        if isinstance(exc, OutputWriteError) or exc.errno not in OUT_OF_SPACE:
            raise
        where = exc.filename if exc.filename is not None else target
        raise OutputWriteError(
            OUT_OF_SPACE[exc.errno], path=where,
            fix=f"free space on the device holding {target.parent} or write the output elsewhere; "
                "nothing partial was kept",
        ) from exc


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
