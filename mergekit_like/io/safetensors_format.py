"""The safetensors container: parse and validate a header, build one.

Layout of a file: an 8-byte little-endian header length N, N bytes of UTF-8
JSON (``{"name": {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}``), then the data; offsets are relative to the
end of the header, and the data must be covered exactly: no overlap, no hole,
nothing after the last tensor. The parser here checks all of that itself
(rather than leaving it to the Rust loader) so that every problem is reported
with the file and tensor it concerns, and so that a hostile length is refused
before anything is allocated for it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_like.errors import InvalidCheckpointError
from mergekit_like.io.dtypes import itemsize, to_safetensors, to_torch
from mergekit_like.io.layout import open_regular_file

# The reference implementation refuses headers over 100 MB; so do we, before reading them.
MAX_HEADER_BYTES = 100_000_000
# Tensors one header may list. The largest public checkpoints hold about 2 * 10**5 tensors in
# all their shards together (60 MoE layers of 384 experts, each expert matrix with its
# quantization scales), so even such a model saved as one file is five times below this. Without
# it the 100 MB above fits 1.7 million zero-size entries, which took a minute and 1.75 GB to list.
MAX_TENSORS = 1_000_000
# An entry has four keys (its name, dtype, shape, data_offsets); one more each leaves room for metadata.
KEYS_PER_ENTRY = 5
# numpy caps arrays at 64 dimensions and real weights have at most 5 or 6; the cap matters because
# torch's cost grows with the square of the rank (a reshape to 10**5 dimensions takes 50 s).
MAX_RANK = 64
# Sizes, strides and byte counts are int64 in torch (and in every reader of the format).
INT64_MAX = 2**63 - 1
# Data starts on an 8-byte boundary, as the reference writer pads it.
HEADER_ALIGNMENT = 8
METADATA_KEY = "__metadata__"


@dataclass(frozen=True, slots=True)  # slots: a header may hold a million of them
class TensorEntry:
    """Where one tensor lives: its file, absolute byte offset, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_bytes(self) -> int:
        """Bytes per index of the first dimension (all of them for a scalar; 0 with no rows)."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: the tensors in data order, and the file's metadata."""

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 0


# What the objects of a header past the tensor limit decode to: one shared value, not a dict each.
_OVER_LIMIT: Any = object()


class _HeaderObjects:
    """``object_pairs_hook`` for a header: refuses duplicate keys, and once the header holds
    more objects or keys than ``MAX_TENSORS`` allows, stops building them (the header is
    refused after the parse, which still counts its tensors for the message)."""

    def __init__(self) -> None:
        self.objects = 0
        self.over_limit = False
        self.last_keys = 0  # the header object is decoded last, so this ends as its tensor count

    def __call__(self, pairs: list[tuple[str, Any]]) -> Any:
        self.objects += 1
        if self.over_limit or self.objects > MAX_TENSORS + 2 or len(pairs) > MAX_TENSORS + 1:  # + metadata, header
            self.over_limit = True
            self.last_keys = len(pairs) - any(key == METADATA_KEY for key, _ in pairs)
            return _OVER_LIMIT
        built = dict(pairs)
        if len(built) < len(pairs):
            raise _DuplicateKey(_first_repeated(key for key, _ in pairs))
        return built


def _first_repeated(keys: Iterable[str]) -> str:
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            return key
        seen.add(key)
    raise AssertionError("no key repeats")


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def read_header(path: str | Path) -> SafetensorsHeader:
    """Reads and validates the header of the safetensors file at ``path``."""
    path = Path(path)
    with os.fdopen(open_regular_file(path), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InvalidCheckpointError(
                f"file is {size} bytes, too short for a safetensors header",
                path=path, fix="the file is truncated or not safetensors; download or save it again",
            )
        (length,) = struct.unpack("<Q", prefix)
        _check_header_length(length, size, path)
        raw = f.read(length)
    return parse_header(raw, file_size=size, path=path)


def _check_header_length(length: int, size: int, path: Path) -> None:
    if length > MAX_HEADER_BYTES:
        raise InvalidCheckpointError(
            f"declares a {length}-byte header, over the {MAX_HEADER_BYTES}-byte limit",
            path=path, fix="the file is corrupt or not safetensors; do not use it",
        )
    if 8 + length > size:
        raise InvalidCheckpointError(
            f"declares a {length}-byte header but the file has only {size - 8} bytes after the length",
            path=path, fix="the file is truncated or corrupt; download or save it again",
        )


def parse_header(raw: bytes, *, file_size: int, path: str | Path) -> SafetensorsHeader:
    """Validates header bytes ``raw`` of a file of ``file_size`` bytes."""
    path = Path(path)
    _check_header_length(len(raw), file_size, path)
    header = _decode_json(raw, path)
    metadata = _parse_metadata(header.pop(METADATA_KEY, None), path)
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    tensors = [_parse_entry(name, spec, path, data_start) for name, spec in header.items()]
    tensors.sort(key=lambda t: (t.start, t.nbytes))
    _check_coverage(tensors, data_size, data_start, path)
    return SafetensorsHeader(path, {t.name: t for t in tensors}, metadata, data_start)


def _decode_json(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidCheckpointError(
            f"header is not UTF-8 (byte {exc.start})", path=path,
            fix="the file is corrupt or not safetensors",
        ) from None
    _refuse_an_object_flood(raw, path)
    objects = _HeaderObjects()
    try:
        header = json.loads(text, object_pairs_hook=objects)
    except _DuplicateKey as dup:
        raise InvalidCheckpointError(
            "header lists this key twice", path=path, tensor=dup.key,
            fix="the file is corrupt; save it again",
        ) from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidCheckpointError(
            f"header is not valid JSON ({exc})" if isinstance(exc, json.JSONDecodeError)
            else "header JSON is nested too deeply",
            path=path, fix="the file is corrupt or not safetensors",
        ) from None
    except ValueError as exc:  # an integer past Python's digit limit (4300 by default)
        raise InvalidCheckpointError(
            f"header holds a number Python refuses to read ({exc})", path=path,
            fix="the file is corrupt or not safetensors",
        ) from None
    _check_tensor_count(header, objects, path)
    if not isinstance(header, dict):
        raise InvalidCheckpointError(
            f"header is a JSON {type(header).__name__}, not an object", path=path,
            fix="the file is corrupt or not safetensors",
        )
    return header


def _refuse_an_object_flood(raw: bytes, path: Path) -> None:
    """Refuses, before parsing, a header with more opening braces than ``MAX_TENSORS`` entries need.

    Parsing is what costs (a 100 MB header of 1.7M empty tensors takes a minute and GBs);
    counting bytes takes milliseconds. Braces inside strings count too, so this is an upper
    bound on the objects: only a header whose strings hold about a million braces could be
    refused wrongly, and no checkpoint's metadata does.
    """
    # Each entry has one data_offsets key, and a quote inside a string is escaped: this counts entries.
    entries = raw.count(b'"data_offsets"')
    if entries > MAX_TENSORS:
        raise InvalidCheckpointError(f"header lists {entries} tensors, over the limit of {MAX_TENSORS} per file",
                                     path=path, fix="the file is corrupt or hostile; do not use it")
    # A key is a string followed by a colon, and a quote in a string is escaped: this counts keys.
    keys = raw.count(b'":')
    if keys > KEYS_PER_ENTRY * MAX_TENSORS:
        raise InvalidCheckpointError(
            f"header holds {keys} keys, more than a header of at most {MAX_TENSORS} tensors needs", path=path,
            fix="the file is corrupt or hostile; do not use it",
        )
    braces = raw.count(b"{")
    if braces > MAX_TENSORS + 2:  # + the header and its metadata
        raise InvalidCheckpointError(
            f"header holds {braces} JSON objects or more, more than a header of at most {MAX_TENSORS} tensors "
            "needs", path=path, fix="the file is corrupt or hostile; do not use it",
        )


def _check_tensor_count(header: Any, objects: _HeaderObjects, path: Path) -> None:
    """Refuses a header listing more than ``MAX_TENSORS`` tensors, before any entry is parsed."""
    if header is _OVER_LIMIT:
        count = objects.last_keys
    elif isinstance(header, dict):
        count = len(header) - (METADATA_KEY in header)
    else:
        count = 0  # not an object: refused as such by the caller
    if count > MAX_TENSORS:
        raise InvalidCheckpointError(
            f"header lists {count} tensors, over the limit of {MAX_TENSORS} per file",
            path=path, fix="the file is corrupt or hostile; do not use it",
        )
    if objects.over_limit:  # few tensors, but more objects (or keys) inside them than entries need
        raise InvalidCheckpointError(
            f"header holds {objects.objects} JSON objects, more than a header of at most {MAX_TENSORS} "
            f"tensors needs, or an object of over {MAX_TENSORS + 1} keys",
            path=path, fix="the file is corrupt or hostile; do not use it",
        )


def _parse_metadata(value: Any, path: Path) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidCheckpointError(
            f"{METADATA_KEY} must map strings to strings", path=path,
            fix="the file is corrupt; save it again",
        )
    return dict(value)


# torch.dtype -> bytes per element; itemsize() allocates a tensor, once per dtype is enough.
_itemsize = functools.cache(itemsize)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(name: str, spec: Any, path: Path, data_start: int) -> TensorEntry:
    def bad(what: str) -> InvalidCheckpointError:
        return InvalidCheckpointError(what, path=path, tensor=name, fix="the file is corrupt; save it again")

    if not isinstance(spec, dict):
        raise bad("header entry is not an object")
    code, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(code, str):
        raise bad("header entry has no string 'dtype'")
    dtype = to_torch(code, path=path, tensor=name)
    size = _itemsize(dtype)
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"shape {_brief(shape)} is not a list of non-negative integers")
    _check_extent(shape, size, code, bad)
    if (
        not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise bad(f"data_offsets {_brief(offsets)} is not a pair [begin, end] with 0 <= begin <= end")
    expected = math.prod(shape) * size
    if offsets[1] - offsets[0] != expected:
        raise bad(
            f"dtype {code} and shape {shape} need {expected} bytes but data_offsets span "
            f"{offsets[1] - offsets[0]}"
        )
    return TensorEntry(name, dtype, tuple(shape), path, data_start + offsets[0], expected)


def _check_extent(shape: list[int], size: int, code: str, bad: Callable[[str], InvalidCheckpointError]) -> None:
    """Refuses shapes torch cannot represent, whatever the element count: ``[0, 2**64]`` holds
    nothing, yet every reader fails on it."""
    if len(shape) > MAX_RANK:
        raise bad(f"shape has {len(shape)} dimensions, over the limit of {MAX_RANK}")
    huge = next((d for d in shape if d > INT64_MAX), None)
    if huge is not None:
        raise bad(f"shape {shape} has a dimension of {huge}, beyond int64 (2**63 - 1)")
    # torch multiplies the other dimensions for strides and storage size even next to a 0, so
    # it refuses [0, 2**62, 2**62]: count empty dimensions as 1 here too.
    span = math.prod(max(d, 1) for d in shape) * size
    if span > INT64_MAX:
        raise bad(f"shape {shape} of dtype {code} overflows int64 element, stride or byte counts")


def _brief(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut short: a hostile header's values can be megabytes long."""
    cut = isinstance(value, (list, str)) and len(value) > limit
    text = repr(value[:limit] if cut else value)
    return text[: limit - 3] + "..." if cut or len(text) > limit else text


def _check_coverage(tensors: list[TensorEntry], data_size: int, data_start: int, path: Path) -> None:
    position = 0
    previous: TensorEntry | None = None
    for entry in tensors:
        begin = entry.start - data_start
        if begin < position:
            raise InvalidCheckpointError(
                f"data [{begin}, {begin + entry.nbytes}) overlaps tensor '{previous.name if previous else '?'}'",
                path=path, tensor=entry.name, fix="the file is corrupt; save it again",
            )
        if begin > position:
            raise InvalidCheckpointError(
                f"leaves a hole of {begin - position} bytes before its data",
                path=path, tensor=entry.name, fix="the file is corrupt; save it again",
            )
        position = begin + entry.nbytes
        previous = entry
    if position > data_size:
        raise InvalidCheckpointError(
            f"data ends at byte {position} but the file holds {data_size} bytes of data",
            path=path, tensor=previous.name if previous else None,
            fix="the file is truncated; download or save it again",
        )
    if position < data_size:
        raise InvalidCheckpointError(
            f"{data_size - position} bytes follow the last tensor's data",
            path=path, fix="the file is corrupt or was appended to; save it again",
        )


def build_header(
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[int]]:
    """Serializes a header for tensors laid out in the given order.

    Returns the bytes to write at the start of the file (length prefix, padded
    JSON) and each tensor's absolute byte offset in the file.
    """
    header: dict[str, Any] = {}
    if metadata:
        header[METADATA_KEY] = dict(metadata)
    relative: list[int] = []
    position = 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * itemsize(dtype)
        header[name] = {
            "dtype": to_safetensors(dtype, tensor=name),
            "shape": list(shape),
            "data_offsets": [position, position + nbytes],
        }
        relative.append(position)
        position += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % HEADER_ALIGNMENT)
    prefix = struct.pack("<Q", len(text)) + text
    return prefix, [len(prefix) + r for r in relative]
