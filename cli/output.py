"""Console output shared by the commands: errors, progress bars, JSON.

Imported at start-up, before any command: nothing here imports torch at module level, so
``--help`` and ``--version`` stay fast (what needs the library imports it inside).
"""

from __future__ import annotations

import errno
import functools
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from mergekit_like.errors import FileAccessError, MergekitLikeError, from_os_error, printable

if TYPE_CHECKING:
    from mergekit_like.io.writer import WrittenCheckpoint
    from mergekit_like.merge.options import Allocator

# Plain text by default: paths, tensor names and messages come from the user and their files,
# and Rich markup in them ("[/]", "[bold]") would be styled, dropped, or crash the print. The
# few styled words pass markup=True and escape what they embed.
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)

@dataclass
class Session:
    """What the app's own options (before the command) set for the command that follows."""

    debug: bool = False  # show tracebacks instead of one line
    low_memory: bool = False  # return freed tensors to the OS at once
    interrupt_reported: bool = False  # a command said it was interrupted (the entry point then says nothing)

    @property
    def allocator(self) -> Allocator:
        """The merges' allocator policy: kept freed memory where it pays, unless --low-memory."""
        return "low_memory" if self.low_memory else "fast"


SESSION = Session()

P = ParamSpec("P")
R = TypeVar("R")

EXIT_KNOWN_ERROR = 2


def handle_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Prints a known error as one line on stderr and exits 2 (traceback with --debug).

    Known: the toolkit's own errors, and any OSError they did not already name (a file this
    user may not read, too many open files), printed with its path and what to do.
    """

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except MergekitLikeError as exc:
            if SESSION.debug:
                raise
            _exit_with_error(exc)
        except OSError as exc:
            if SESSION.debug or exc.errno == errno.EPIPE:  # a closed pipe (| head): Typer leaves quietly
                raise
            _exit_with_error(from_os_error(exc, FileAccessError))
        except KeyboardInterrupt:
            err_console.print("interrupted; nothing was written", highlight=False)
            SESSION.interrupt_reported = True
            raise typer.Exit(130) from None

    return wrapper


def _exit_with_error(exc: MergekitLikeError) -> NoReturn:
    # The message is plain text: brackets in it ("[inf]", a path) are not markup.
    err_console.print(f"[bold red]error:[/] {escape(printable(str(exc)))}", markup=True, highlight=False,
                      soft_wrap=True)
    raise typer.Exit(EXIT_KNOWN_ERROR) from None


def size_option(text: str, option: str = "--shard-size") -> int:
    """A byte count given on the command line (``5GB``, ``256MiB``), or a usage error naming the option."""
    from mergekit_like.io.sharding import parse_size  # imports torch: only once a command runs

    try:
        return parse_size(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def one_output(positional: Path | None, option: Path | None) -> Path:
    """The output directory, given as the last argument (as mergekit-yaml takes it) or with -o."""
    if positional is not None and option is not None and positional != option:
        raise typer.BadParameter(f"two outputs given: {positional} and -o {option}; give one", param_hint="-o")
    output = positional or option
    if output is None:
        raise typer.BadParameter("give the output directory (as the last argument, or with -o)", param_hint="-o")
    return output


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def human_count(n: int) -> str:
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


class RichProgress:
    """A progress bar over bytes (so speed and ETA are right) that also counts tensors."""

    def __init__(self, description: str, *, enabled: bool = True) -> None:
        self.description = description
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._done = 0

    def __enter__(self) -> RichProgress:
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[done]}/{task.fields[items]} tensors"),
                DownloadColumn(binary_units=False),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=err_console,
            )
            self._progress.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.__exit__(exc_type, exc, tb)

    def start(self, total_items: int, total_bytes: int) -> None:
        if self._progress is not None:
            self._task = self._progress.add_task(
                self.description, total=max(total_bytes, 1), done=0, items=total_items
            )

    def advance(self, name: str, nbytes: int) -> None:
        self._done += 1
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=nbytes, done=self._done)


def warn_nonfinite(written: Iterable[WrittenCheckpoint]) -> None:
    """One line per output holding NaN or infinite values, naming the worst tensors (always shown:
    --quiet silences progress, not a broken output)."""
    for checkpoint in written:
        note = checkpoint.nonfinite_note()
        if note is not None:
            err_console.print(f"warning: {printable(note)}", highlight=False, soft_wrap=True)
