"""Where a checkpoint's files are: Hugging Face directory layouts and single files.

A user points at a directory (``model.safetensors.index.json`` plus shards, a
single ``model.safetensors``, another ``*.safetensors`` name with or without
an index, or ``pytorch_model*.bin`` pickles) or at one file. This module finds
the files and validates the index; it reads no tensor data.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mergekit_like.errors import (
    CheckpointNotFoundError,
    FileAccessError,
    InvalidCheckpointError,
    UnsafeCheckpointError,
    from_os_error,
)

Format = Literal["safetensors", "pickle"]

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
DEFAULT_INDEX = "model.safetensors.index.json"
DEFAULT_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"

NOT_REGULAR_FIX = "a checkpoint's weights and index must be regular files; point at the real files"

# The largest public checkpoints list about 2 * 10**5 tensors in their index (60 MoE layers of
# 384 experts, each expert matrix with its quantization scales), so this is five times the
# largest real model while bounding what a hostile index makes us build (as a header's bound).
MAX_INDEX_TENSORS = 1_000_000
# An index line (tensor name and shard name) is about 100 bytes, so the tensors allowed above
# fit in about 100 MB; twice that leaves room for long names. Checked before reading the file.
MAX_INDEX_BYTES = 200_000_000

# The tool's own converter keeps every tensor under its stored name; a round trip through
# transformers' AutoModel would drop the head and rename tensors (the "transformer." prefix).
CONVERT_HINT = (
    "convert it to safetensors once, tensor for tensor: mergekit-like convert DIR DIR-st --allow-pickle "
    "(if you trust its source), or pass --allow-pickle here to load it with torch.load(weights_only=True)"
)


@dataclass(frozen=True)
class CheckpointLayout:
    """The files of one checkpoint, validated for names and existence."""

    root: Path
    format: Format
    files: tuple[Path, ...]
    index_path: Path | None = None
    # tensor name -> shard path, as the index says; None without an index.
    weight_map: dict[str, Path] | None = None

    @property
    def source(self) -> Path:
        """What to name in messages: the index if there is one, else the single file."""
        return self.index_path or (self.files[0] if len(self.files) == 1 else self.root)


def resolve(path: str | Path, *, allow_pickle: bool = False) -> CheckpointLayout:
    """Finds the checkpoint at ``path`` (a directory, index file or weights file)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(
            "no such file or directory", path=path,
            fix="check the path (Hub ids are resolved by the commands that accept them)",
        )
    if path.is_dir():
        return _resolve_directory(path, allow_pickle)
    require_regular_file(path)
    if path.name.endswith(".index.json"):
        return _from_index(path, allow_pickle)
    if path.suffix == SAFETENSORS_SUFFIX:
        return CheckpointLayout(path.parent, "safetensors", (path,))
    if path.suffix in PICKLE_SUFFIXES:
        _require_pickle_allowed(path, allow_pickle)
        return CheckpointLayout(path.parent, "pickle", (path,))
    raise InvalidCheckpointError(
        "is neither a .safetensors file, an index .json nor a checkpoint directory", path=path,
        fix="point at the checkpoint directory or its weights file",
    )


# A PEFT adapter's files (named here, below the adapters package, so the readers and verify know them).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _resolve_directory(root: Path, allow_pickle: bool) -> CheckpointLayout:
    # Every entry, not only regular files: a FIFO or folder named model.safetensors is an error
    # that names it (raised where the chosen file is checked), not a reason to read another file.
    names = sorted(p.name for p in root.iterdir())
    if ADAPTER_CONFIG in names:
        # Its lora_A and lora_B are factors of a change to a model, not weights: averaged
        # as weights they mean nothing (and the output would not load as an adapter).
        raise InvalidCheckpointError(
            "is a LoRA adapter (adapter_config.json), not a model", path=root,
            fix="merge it into its base first (mergekit-like merge --method linear BASE+ADAPTER -p weight=1 -o OUT; "
                "merge and soup read adapters as they are), or name its adapter_model.safetensors to look at it",
        )
    st_indexes = [n for n in names if n.endswith(SAFETENSORS_SUFFIX + ".index.json")]
    if DEFAULT_INDEX in st_indexes:
        return _from_index(root / DEFAULT_INDEX, allow_pickle)
    if DEFAULT_SINGLE in names:
        return _single(root, DEFAULT_SINGLE, "safetensors")
    if len(st_indexes) == 1:
        return _from_index(root / st_indexes[0], allow_pickle)
    if len(st_indexes) > 1:
        raise _ambiguous(root, st_indexes)
    singles = [n for n in names if n.endswith(SAFETENSORS_SUFFIX)]
    if len(singles) == 1:
        return _single(root, singles[0], "safetensors")
    if len(singles) > 1:
        raise _ambiguous(root, singles, extra="add an index (*.safetensors.index.json) for shards")
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if PICKLE_INDEX in names:
        return _from_index(root / PICKLE_INDEX, allow_pickle)
    if pickles:
        chosen = "pytorch_model.bin" if "pytorch_model.bin" in pickles else None
        if chosen is None and len(pickles) > 1:
            raise _ambiguous(root, pickles)
        name = chosen or pickles[0]
        _require_pickle_allowed(root / name, allow_pickle)
        return _single(root, name, "pickle")
    raise CheckpointNotFoundError(
        "holds no checkpoint (looked for *.safetensors.index.json, model.safetensors, "
        "*.safetensors, pytorch_model*.bin)",
        path=root, fix="point at a directory saved with save_pretrained, or at a weights file",
    )


def _ambiguous(root: Path, candidates: list[str], extra: str | None = None) -> InvalidCheckpointError:
    fix = "point at one of them directly"
    if extra:
        fix += f", or {extra}"
    shown = ", ".join(candidates[:6]) + (" ..." if len(candidates) > 6 else "")
    return InvalidCheckpointError(f"holds several candidate checkpoints ({shown})", path=root, fix=fix)


def _require_pickle_allowed(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise UnsafeCheckpointError(
            "is a pickle checkpoint, and unpickling a file can run code", path=path, fix=CONVERT_HINT
        )


def _from_index(index_path: Path, allow_pickle: bool) -> CheckpointLayout:
    root = index_path.parent
    fmt: Format = "pickle" if index_path.name.endswith(".bin.index.json") else "safetensors"
    if fmt == "pickle":
        _require_pickle_allowed(index_path, allow_pickle)
    raw = _load_index_json(index_path)
    suffix = PICKLE_SUFFIXES if fmt == "pickle" else (SAFETENSORS_SUFFIX,)
    weight_map: dict[str, Path] = {}
    shards: dict[str, Path] = {}
    for tensor, shard in raw.items():
        if shard not in shards:
            shards[shard] = _check_shard_name(index_path, tensor, shard, suffix)
        weight_map[tensor] = shards[shard]
    return CheckpointLayout(root, fmt, tuple(sorted(shards.values())), index_path, weight_map)


def _load_index_json(index_path: Path) -> dict[str, Any]:
    def bad(what: str) -> InvalidCheckpointError:
        return InvalidCheckpointError(
            what, path=index_path, fix="fix or regenerate the index (save_pretrained writes one)"
        )

    with os.fdopen(open_regular_file(index_path), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(MAX_INDEX_BYTES + 1) if size <= MAX_INDEX_BYTES else b""
    if size > MAX_INDEX_BYTES or len(raw) > MAX_INDEX_BYTES:  # the second: it grew after the fstat
        raise bad(f"index is {max(size, len(raw))} bytes, over the {MAX_INDEX_BYTES}-byte limit")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise bad("index is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise bad(f"index is not valid JSON ({exc})") from None
    except RecursionError:
        raise bad("index JSON is nested too deeply") from None
    except ValueError as exc:  # an integer past Python's digit limit
        raise bad(f"index JSON holds a value Python refuses ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise bad("index has no 'weight_map' object")
    weight_map = data["weight_map"]
    if len(weight_map) > MAX_INDEX_TENSORS:
        raise bad(f"index lists {len(weight_map)} tensors, over the limit of {MAX_INDEX_TENSORS}")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise InvalidCheckpointError(
                f"weight_map value {shard!r} is not a file name", path=index_path, tensor=tensor,
                fix="fix or regenerate the index",
            )
    return weight_map


def _check_shard_name(index_path: Path, tensor: str, shard: str, suffixes: tuple[str, ...]) -> Path:
    root = index_path.parent

    def unsafe(what: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(
            what, path=index_path, tensor=tensor,
            fix="shards must be plain file names inside the checkpoint directory; fix the index",
        )

    if not shard or shard in (".", "..") or "/" in shard or "\\" in shard or "\0" in shard:
        raise unsafe(f"shard name {shard!r} is not a plain file name")
    if os.path.isabs(shard) or Path(shard).drive:
        raise unsafe(f"shard name {shard!r} is an absolute path")
    if not shard.endswith(suffixes):
        raise InvalidCheckpointError(
            f"shard {shard!r} does not end in {' or '.join(suffixes)}", path=index_path, tensor=tensor,
            fix="the index mixes formats; point at the index of the format you want to read",
        )
    path = root / shard
    mode = _mode(path)
    if mode is None:
        raise CheckpointNotFoundError(
            f"shard {shard!r} named by the index is missing", path=index_path, tensor=tensor,
            fix="download the checkpoint again, completely",
        )
    if not stat.S_ISREG(mode):
        raise InvalidCheckpointError(
            f"shard {path} named by the index is {_kind(mode)}, not a regular file",
            path=index_path, tensor=tensor, fix=NOT_REGULAR_FIX,
        )
    if not _inside(path, root):
        raise unsafe(f"shard {shard!r} is a link to a file outside the checkpoint directory")
    return path


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` resolves inside ``root``, or into the blob store of the Hub cache
    snapshot ``root`` is (or is a folder of, like a training run's ``checkpoint-N``):
    ``models--org--name/snapshots/REV`` links its files to ``models--org--name/blobs``."""
    real = os.path.realpath(path)
    allowed = [os.path.realpath(root)]
    for folder in (root, *root.parents):
        if folder.parent.name == "snapshots":
            allowed.append(os.path.realpath(folder.parent.parent / "blobs"))
            break
    return any(os.path.commonpath([real, a]) == a for a in allowed)


def _single(root: Path, name: str, fmt: Format) -> CheckpointLayout:
    path = root / name
    require_regular_file(path)
    if not _inside(path, root):
        raise UnsafeCheckpointError(
            "is a link to a file outside the checkpoint directory", path=path,
            fix="copy the file into the directory instead of linking it",
        )
    return CheckpointLayout(root, fmt, (path,))


def _mode(path: Path) -> int | None:
    """The file type and mode bits of ``path`` (links followed), or None where nothing is there."""
    try:
        return os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # links in a loop lead to no file
            return None
        raise


def _kind(mode: int) -> str:
    kinds = [
        (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
    ]
    return next((name for test, name in kinds if test(mode)), "a special file")


def _refuse_unless_regular(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise InvalidCheckpointError(f"is {_kind(mode)}, not a regular file", path=path, fix=NOT_REGULAR_FIX)


def require_regular_file(path: Path) -> None:
    """Refuses anything at ``path`` but a regular file (links followed), without opening it:
    opening a FIFO waits for a writer forever, and a device can stream without end."""
    mode = _mode(path)
    if mode is None:
        raise CheckpointNotFoundError(
            "no such file (or a link to a missing one)", path=path,
            fix="check the path, or download the checkpoint again",
        )
    _refuse_unless_regular(path, mode)


def open_regular_file(path: Path) -> int:
    """Opens ``path`` read-only and returns the descriptor, refusing anything but a regular file.

    The stat comes first, so nothing else is ever opened; O_NONBLOCK then keeps open() from
    waiting should the path have been swapped for a FIFO since, and fstat refuses what was opened.
    """
    require_regular_file(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as refused:  # permission denied, too many open files: one line naming the file
        raise from_os_error(refused, FileAccessError, path=path) from refused
    try:
        _refuse_unless_regular(path, os.fstat(fd).st_mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # the flag was for open() only; reads must wait for data
    except BaseException:
        os.close(fd)
        raise
    return fd
