"""How long-running library calls report progress without depending on a UI."""

from __future__ import annotations

from typing import Protocol


class ProgressSink(Protocol):
    """Told about each unit of work as it completes; the CLI draws a rich bar from it."""

    def start(self, total_items: int, total_bytes: int) -> None: ...

    def advance(self, name: str, nbytes: int) -> None: ...


class NullProgress:
    """Reports nothing (library default)."""

    def start(self, total_items: int, total_bytes: int) -> None:
        return None

    def advance(self, name: str, nbytes: int) -> None:
        return None
