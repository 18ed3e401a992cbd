"""A sha256 manifest of every file of an output, written with it and checked by `verify`.

The format is ``sha256sum``'s (``<hex>  <file>`` per line), so
``sha256sum -c checksums.sha256`` checks a directory without this tool.
"""

from __future__ import annotations

import hashlib
import os
import string
from collections.abc import Iterable, Mapping
from pathlib import Path

from mergekit_like.errors import InvalidCheckpointError, OutputWriteError
from mergekit_like.io.layout import open_regular_file

CHECKSUMS = "checksums.sha256"
_READ = 8 * 1024 * 1024
# A line is a 64-digit digest, two spaces and a file name (at most 255 bytes), so this holds
# 50,000 files, ten times the shards of the largest public checkpoint. Checked before reading:
# a manifest swapped for a link to a huge file must not be read into memory.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MANIFEST_FIX = f"restore {CHECKSUMS} from where the output was written, or write the output again"


def sha256_of(path: Path) -> str:
    """The file's sha256; anything but a regular file is refused unopened (a FIFO would block the read)."""
    digest = hashlib.sha256()
    with os.fdopen(open_regular_file(path), "rb") as f:
        while chunk := f.read(_READ):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(directory: Path, files: Iterable[str], known: Mapping[str, str] | None = None) -> None:
    """Writes the manifest of ``files``; ``known`` digests (computed while writing) spare reading those back."""
    known = known or {}
    lines = [f"{known.get(name) or sha256_of(directory / name)}  {name}\n" for name in sorted(files)]
    (directory / CHECKSUMS).write_text("".join(lines), encoding="utf-8")


def write_manifest(directory: Path, known: Mapping[str, str] | None = None) -> None:
    """Writes the manifest of every file in ``directory``, which the caller has finished writing.

    Called last, on a directory only this tool wrote (the temporary directory of an atomic
    output), so whatever is there, weights or side file, is the tool's and is covered, and a
    side file added to the writers later is covered without a change here.
    """
    names = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name == CHECKSUMS:
            continue
        if not entry.is_file(follow_symlinks=False):
            # The manifest lists files by name only; `verify` would report this entry as foreign.
            raise OutputWriteError("the output holds a folder or special file, which its manifest cannot list",
                                   path=entry.path, fix="write only regular files into an output directory")
        names.append(entry.name)
    write_checksums(directory, names, known)


def read_checksums(directory: Path) -> dict[str, str] | None:
    """file name -> expected sha256, or None when nothing at all is named ``checksums.sha256``.

    Anything else there that is not a well-formed manifest in a regular file (a folder, a FIFO,
    a device, a link to one or to nothing, a file past :data:`MAX_MANIFEST_BYTES`, a bad line)
    is an :class:`InvalidCheckpointError`: the output had a manifest and it was replaced.
    """
    path = directory / CHECKSUMS
    if not os.path.lexists(path):
        return None
    text = _manifest_text(path)
    expected: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or not _is_sha256(digest) or "/" in name or name in ("", ".", ".."):
            raise InvalidCheckpointError(f"line {number} is not '<sha256>  <file name>'", path=path,
                                         fix=MANIFEST_FIX)
        if name in expected:
            raise InvalidCheckpointError(f"line {number} lists '{name}' a second time", path=path, fix=MANIFEST_FIX)
        expected[name] = digest
    return expected


def _manifest_text(path: Path) -> str:
    """The manifest's text, read only from a regular file of a sane size (never blocking)."""
    try:
        fd = open_regular_file(path)
    except InvalidCheckpointError as exc:
        raise InvalidCheckpointError(f"{exc.what}: the manifest was replaced", path=path, fix=MANIFEST_FIX) from None
    except FileNotFoundError:  # a link to nothing, or a loop of links
        raise InvalidCheckpointError("is a link to no file, not a regular file: the manifest was replaced",
                                     path=path, fix=MANIFEST_FIX) from None
    with os.fdopen(fd, "rb") as f:
        if os.fstat(f.fileno()).st_size > MAX_MANIFEST_BYTES:
            raise InvalidCheckpointError(f"is larger than any manifest ({MAX_MANIFEST_BYTES} bytes)", path=path,
                                         fix=MANIFEST_FIX)
        data = f.read(MAX_MANIFEST_BYTES + 1)  # bounded even should the file grow while read
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidCheckpointError("is not UTF-8 text", path=path, fix=MANIFEST_FIX) from None


def _is_sha256(digest: str) -> bool:
    return len(digest) == 64 and all(c in string.hexdigits for c in digest)

