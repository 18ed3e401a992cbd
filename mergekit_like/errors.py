"""Every error the toolkit raises on purpose.

Each class also inherits the matching built-in, so callers that catch
``FileNotFoundError`` or ``ValueError`` keep working. Messages name the file,
the tensor and the model involved and end with what to do about it; the CLI
prints ``str(error)`` as one line.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

# The most characters of a user's value that a message shows (a recipe value can be megabytes).
SHORT_CHARS = 80


def short_text(text: str) -> str:
    """``text`` cut to :data:`SHORT_CHARS` characters, with "..." when cut."""
    return text if len(text) <= SHORT_CHARS else text[:SHORT_CHARS] + "..."


def short_repr(value: Any) -> str:
    """A user value as an error message shows it: its repr, cut to :data:`SHORT_CHARS` characters.

    Built piece by piece and stopped once long enough, so a huge or recursive value costs
    no more than a short one.
    """
    text = ""
    for piece in _repr_pieces(value):
        text += piece
        if len(text) > SHORT_CHARS:
            break
    return short_text(text)


def _repr_pieces(value: Any) -> Iterator[str]:
    """``repr(value)`` in pieces (each container level yields a character before going deeper)."""
    if isinstance(value, (list, tuple)):
        yield "[" if isinstance(value, list) else "("
        for i, item in enumerate(value):
            yield ", " if i else ""
            yield from _repr_pieces(item)
        yield "," if isinstance(value, tuple) and len(value) == 1 else ""
        yield "]" if isinstance(value, list) else ")"
    elif isinstance(value, dict):
        yield "{"
        for i, (key, item) in enumerate(value.items()):
            yield ", " if i else ""
            yield from _repr_pieces(key)
            yield ": "
            yield from _repr_pieces(item)
        yield "}"
    elif isinstance(value, (str, bytes)):
        yield repr(value[:SHORT_CHARS + 1])  # longer is cut anyway
    else:
        try:
            yield repr(value)
        except ValueError:  # an integer past Python's digit limit for str()
            yield f"<{type(value).__name__} too large to show>"


def printable(text: str) -> str:
    """``text`` with control characters written as escapes (``\\n``, ``\\x1b``): a name or path read
    from a file may hold a newline that starts a Markdown heading, or a terminal escape sequence."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


class MergekitLikeError(Exception):
    """Base class of every error this toolkit raises deliberately."""


def describe(where: str | Path | None, tensor: str | None, what: str, fix: str | None) -> str:
    """Builds the one-line message: ``FILE: tensor 'NAME': WHAT. FIX``."""
    parts = []
    if where is not None:
        parts.append(f"{where}:")
    if tensor is not None:
        parts.append(f"tensor '{tensor}':")
    parts.append(what.rstrip("."))
    message = " ".join(parts) + "."
    if fix:
        message += f" {fix[0].upper()}{fix[1:].rstrip('.')}."
    return message


class _Located(MergekitLikeError):
    """An error about one place: a file, optionally one tensor in it."""

    def __init__(
        self,
        what: str,
        *,
        path: str | Path | None = None,
        tensor: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.tensor = tensor
        self.what = what
        self.fix = fix
        super().__init__(describe(path, tensor, what, fix))


class CheckpointNotFoundError(_Located, FileNotFoundError):
    """The path holds no checkpoint, or a file the checkpoint names is missing."""


class InvalidCheckpointError(_Located, ValueError):
    """A checkpoint file or index is malformed, truncated or inconsistent."""


class UnsafeCheckpointError(_Located, PermissionError):
    """Reading the file would execute code (pickle) or escape its directory."""


class OutputExistsError(_Located, FileExistsError):
    """The output directory exists and is not empty, and overwriting was not asked for."""


class OutputLockedError(_Located, BlockingIOError):
    """Another run is writing the same output directory right now."""


class OutputWriteError(_Located, OSError):
    """Writing the output failed (disk full, permissions); nothing partial was kept."""


class FileAccessError(_Located, OSError):
    """The system refused a file or directory: permission denied, read-only file system, too many open files."""


class TensorWriteError(_Located, ValueError):
    """A tensor handed to the writer does not match the planned name, dtype or shape."""


class IncompatibleModelsError(_Located, ValueError):
    """Input models disagree on tensor names, shapes or dtypes."""


class UnsupportedDtypeError(_Located, TypeError):
    """A dtype that safetensors or this torch build cannot represent."""


class RecipeError(MergekitLikeError, ValueError):
    """A recipe has problems; every problem found is listed at once."""

    def __init__(self, problems: Sequence[str], *, source: str | Path | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source is not None else ""
        if len(self.problems) == 1:
            message = f"{where}{self.problems[0]}"
        else:
            listed = "; ".join(f"({i}) {p}" for i, p in enumerate(self.problems, 1))
            message = f"{where}{len(self.problems)} problems: {listed}"
        super().__init__(message)


class MergeError(_Located, ArithmeticError):
    """A merge kernel cannot compute a tensor (for example a zero weight sum)."""


class HubError(_Located, RuntimeError):
    """Talking to the Hugging Face Hub failed, or what was to be pushed is not fit to push."""


class HubAuthError(HubError, PermissionError):
    """No token, or a token without the needed permission (HTTP 401/403)."""


class HubNotFoundError(HubError, FileNotFoundError):
    """The repo, revision or file does not exist on the Hub (or is private)."""


class HubNetworkError(HubError, ConnectionError):
    """The Hub could not be reached, or kept failing after retries."""


class InvalidRepoIdError(HubError, ValueError):
    """A repo name the Hub would refuse."""


class DeviceError(_Located, ValueError):
    """A compute device that this machine does not have, or that this tool does not merge on."""


class HookUsageError(MergekitLikeError, RuntimeError):
    """The training hook was called in a way it does not support (the message says which call)."""


class UnknownAverageError(MergekitLikeError, KeyError):
    """An average label the hook does not keep; the message lists the labels it does."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class SidecarError(MergekitLikeError, RuntimeError):
    """The averaging sidecar process died, or did not answer within its time limit."""


class AveragesNotSavedError(SidecarError):
    """The training hook's final save failed; the message names the cause and what ``out_dir`` holds instead."""


class OptionsError(MergekitLikeError, ValueError):
    """Settings of a run (not of its recipe) out of range: memory budget, shard size, threads."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class EvaluationError(MergekitLikeError, RuntimeError):
    """The evaluator of a soup or a search failed or gave no score; ``output``: all it printed."""

    def __init__(self, message: str, *, output: str | None = None) -> None:
        super().__init__(message)
        self.output = output


class SearchError(MergekitLikeError, RuntimeError):
    """A merge search cannot go on: every trial failed, the cluster is unreachable, the study is not this one."""


# -- the system's refusals (OSError) in words a user can act on ---------------------------------

PERMISSION_FIX = "check its permissions (ls -l) or those of its directory, or use a path this user may access"
DESCRIPTORS_FIX = "raise the limit with ulimit -n or merge fewer inputs at once"
SPACE_FIX = "free space on the device, or write elsewhere"

# errno -> (what failed, what to do). An errno not listed is described by its strerror.
OS_ERROR_WORDS: dict[int, tuple[str, str]] = {
    errno.EACCES: ("permission denied", PERMISSION_FIX),
    errno.EPERM: ("operation not permitted", PERMISSION_FIX),
    errno.EROFS: ("read-only file system", "use a path on a writable file system"),
    errno.EMFILE: ("too many open files", DESCRIPTORS_FIX),
    errno.ENFILE: ("too many open files on this system", "close other programs' files, or merge fewer inputs at once"),
    errno.ENOSPC: ("no space left on device", SPACE_FIX),
    errno.EDQUOT: ("no space left on device (disk quota exceeded)", SPACE_FIX),
    errno.EFBIG: ("file size limit exceeded",
                  "raise the file size limit (ulimit -f) or use a smaller --shard-size"),
    errno.EIO: ("input/output error", "the device reported a fault: check it (dmesg), then copy the file again"),
    errno.ENAMETOOLONG: ("file name too long", "use a shorter path"),
}
OTHER_OS_ERROR_FIX = "check the path, then run again"

L = TypeVar("L", bound=_Located)


def os_error_words(exc: OSError) -> tuple[str, str | None]:
    """What ``exc`` says failed, in words (``"permission denied"``), and what to do about it.

    An error that names no file and no errno we know (a network library's, say) gets no
    fix: a guess would mislead.
    """
    if exc.errno in OS_ERROR_WORDS:
        return OS_ERROR_WORDS[exc.errno]
    reason = exc.strerror or str(exc) or type(exc).__name__
    return reason[:1].lower() + reason[1:], OTHER_OS_ERROR_FIX if os_error_path(exc) is not None else None


def os_error_path(exc: OSError) -> Path | None:
    """The path an OSError names, if any (it may name a descriptor instead, or nothing)."""
    if isinstance(exc.filename, (str, bytes, os.PathLike)):
        return Path(os.fsdecode(exc.filename))
    return None


def from_os_error(
    exc: OSError,
    error_type: type[L],
    *,
    path: str | Path | None = None,
    doing: str | None = None,
    fix: str | None = None,
) -> L:
    """``exc`` as one of this module's errors: ``PATH: [DOING (]WHAT[)]. FIX.``

    ``path`` defaults to the file the OSError names; ``doing`` says what the toolkit was doing
    when a bare reason would not ("cannot create the scratch directory"). The errno is kept, so
    callers that test ``error.errno`` keep working.
    """
    what, default_fix = os_error_words(exc)
    error = error_type(
        f"{doing} ({what})" if doing else what,
        path=path if path is not None else os_error_path(exc),
        fix=fix or default_fix,
    )
    if isinstance(error, OSError):
        error.errno = exc.errno
    return error
