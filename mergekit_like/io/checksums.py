"""A sha256 manifest of the shards, written with every output and checked by `verify`.

The format is ``sha256sum``'s (``<hex>  <file>`` per line), so
``sha256sum -c checksums.sha256`` checks a directory without this tool.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

CHECKSUMS = "checksums.sha256"
_READ = 8 * 1024 * 1024


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(directory: Path, files: Iterable[str], known: Mapping[str, str] | None = None) -> None:
    """Writes the manifest; ``known`` digests (computed while writing) spare reading those files back."""
    known = known or {}
    lines = [f"{known.get(name) or sha256_of(directory / name)}  {name}\n" for name in sorted(files)]
    (directory / CHECKSUMS).write_text("".join(lines), encoding="utf-8")


def read_checksums(directory: Path) -> dict[str, str] | None:
    """file name -> expected sha256, or None without a manifest. Malformed lines raise ValueError."""
    path = directory / CHECKSUMS
    if not path.is_file():
        return None
    expected = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or "/" in name or name in ("", ".", ".."):
            raise ValueError(f"{path}: line {number} is not '<sha256>  <file name>'")
        expected[name] = digest
    return expected
