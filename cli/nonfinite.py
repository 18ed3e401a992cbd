"""The warning every writing command ends with when it wrote NaN or infinite values."""

from __future__ import annotations

from collections.abc import Iterable

from mergekit_like.cli.output import err_console

from mergekit_like.errors import printable
from mergekit_like.io.writer import WrittenCheckpoint


def warn_nonfinite(written: Iterable[WrittenCheckpoint]) -> None:
    """One line per output holding NaN or infinite values, naming the worst tensors (always shown:
    --quiet silences progress, not a broken output)."""
    for checkpoint in written:
        note = checkpoint.nonfinite_note()
        if note is not None:
            err_console.print(f"warning: {printable(note)}", highlight=False, soft_wrap=True)
