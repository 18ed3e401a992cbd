"""Hostile inputs found by an adversarial pass: special files where a checkpoint file is
expected, shapes no reader can build, and headers listing millions of tensors.

A call that used to block forever (opening a FIFO) runs in a thread with a deadline; past
it the test opens the FIFO for writing, which releases the blocked open(), and fails.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import write_checkpoint, write_raw_safetensors
from mergekit_like.cli.main import app
from typer.testing import CliRunner

from mergekit_like.errors import InvalidCheckpointError
from mergekit_like.io import layout, open_checkpoint, safetensors_format
from mergekit_like.io.safetensors_format import parse_header
from mergekit_like.io.verify import verify_checkpoint

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes (POSIX)")
DEADLINE_S = 5.0


def _release(fifo: Path) -> None:
    """Lets a reader blocked in open() on ``fifo`` through (it then reads end of file)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader waiting (ENXIO), or the FIFO is gone


def within_deadline(call: Callable[[], Any], fifos: list[Path]) -> Any:
    """Runs ``call`` in a thread; returns its result or raises its exception, and fails the
    test (after freeing the thread) if it is still running after DEADLINE_S seconds."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the test's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    if thread.is_alive():
        for _ in range(50):  # each release lets one blocked open() through
            for fifo in fifos:
                _release(fifo)
            thread.join(0.1)
            if not thread.is_alive():
                break
        pytest.fail(f"still blocked after {DEADLINE_S} s (on a FIFO: {', '.join(map(str, fifos))})")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def assert_not_regular(error: pytest.ExceptionInfo[InvalidCheckpointError], path: Path, kind: str) -> None:
    message = str(error.value)
    assert str(path) in message and kind in message and "not a regular file" in message, message


def sharded(tmp_path: Path) -> Path:
    tensors = {f"w{i}": torch.full((4,), float(i)) for i in range(4)}
    return write_checkpoint(tmp_path / "ckpt", tensors, max_shard_size=32)


# -- 1. only regular files are opened ------------------------------------------------------

@needs_fifo
def test_fifo_given_as_the_checkpoint_file(tmp_path: Path) -> None:
    fifo = tmp_path / "p.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(InvalidCheckpointError) as info:
        within_deadline(lambda: open_checkpoint(fifo), [fifo])
    assert_not_regular(info, fifo, "FIFO")


@needs_fifo
def test_fifo_named_model_safetensors_in_a_model_directory(tmp_path: Path) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(InvalidCheckpointError) as info:
        within_deadline(lambda: open_checkpoint(tmp_path), [fifo])
    assert_not_regular(info, fifo, "FIFO")


@needs_fifo
@pytest.mark.parametrize("given", ["directory", "index"])
def test_fifo_as_the_index_file(tmp_path: Path, given: str) -> None:
    directory = sharded(tmp_path)
    index = directory / "model.safetensors.index.json"
    index.unlink()
    os.mkfifo(index)
    with pytest.raises(InvalidCheckpointError) as info:
        within_deadline(lambda: open_checkpoint(directory if given == "directory" else index), [index])
    assert_not_regular(info, index, "FIFO")


@needs_fifo
def test_fifo_as_a_shard_named_by_the_index(tmp_path: Path) -> None:
    directory = sharded(tmp_path)
    shard = directory / "model-00002-of-00002.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(InvalidCheckpointError) as info:
        within_deadline(lambda: open_checkpoint(directory), [shard])
    assert_not_regular(info, shard, "FIFO")
    assert "model.safetensors.index.json" in str(info.value) and "tensor 'w" in str(info.value)


@needs_fifo
def test_shard_swapped_for_a_fifo_after_opening_is_refused_when_read(tmp_path: Path) -> None:
    directory = sharded(tmp_path)
    shard = directory / "model-00002-of-00002.safetensors"
    with open_checkpoint(directory) as checkpoint:
        name = next(e.name for e in checkpoint.entries() if e.file == shard)
        shard.unlink()
        os.mkfifo(shard)
        with pytest.raises(InvalidCheckpointError) as info:
            within_deadline(lambda: checkpoint.read(name), [shard])
    assert_not_regular(info, shard, "FIFO")


@needs_fifo
def test_fifo_that_passes_the_stat_is_still_refused_after_a_nonblocking_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second guard: a path swapped for a FIFO between the stat and the open."""
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    monkeypatch.setattr(layout, "require_regular_file", lambda path: None)
    with pytest.raises(InvalidCheckpointError) as info:
        within_deadline(lambda: layout.open_regular_file(fifo), [fifo])
    assert_not_regular(info, fifo, "FIFO")


@pytest.mark.parametrize("where", ["single", "shard", "index"])
def test_directory_where_a_file_is_expected(tmp_path: Path, where: str) -> None:
    if where == "single":
        expected = tmp_path / "model.safetensors"
        expected.mkdir()
        target = tmp_path
    else:
        target = sharded(tmp_path)
        expected = target / ("model-00001-of-00002.safetensors" if where == "shard" else "model.safetensors.index.json")
        expected.unlink()
        expected.mkdir()
    with pytest.raises(InvalidCheckpointError) as info:
        open_checkpoint(target)
    assert_not_regular(info, expected, "directory")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_character_device_behind_a_safetensors_name(tmp_path: Path) -> None:
    link = tmp_path / "zero.safetensors"
    link.symlink_to("/dev/zero")
    with pytest.raises(InvalidCheckpointError) as info:
        open_checkpoint(link)
    assert_not_regular(info, link, "character device")


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs Unix sockets")
def test_socket_named_model_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(path))
        with pytest.raises(InvalidCheckpointError) as info:
            open_checkpoint(tmp_path)
    assert_not_regular(info, path, "socket")


@needs_fifo
def test_inspect_on_a_fifo_prints_one_line(tmp_path: Path) -> None:
    fifo = tmp_path / "p.safetensors"
    os.mkfifo(fifo)
    result = within_deadline(lambda: CliRunner().invoke(app, ["inspect", str(fifo)]), [fifo])
    assert result.exit_code != 0
    assert "error:" in result.output and "not a regular file" in result.output
    assert "Traceback" not in result.output


@needs_fifo
def test_verify_names_a_fifo_listed_in_the_checksums_without_reading_it(tmp_path: Path) -> None:
    directory = sharded(tmp_path)
    fifo = directory / "tokenizer.json"
    os.mkfifo(fifo)
    (directory / "checksums.sha256").write_text(f"{'0' * 64}  tokenizer.json\n")
    report = within_deadline(lambda: verify_checkpoint(directory), [fifo])
    assert any(str(fifo) in p and "not a regular file" in p for p in report.problems), report.problems


# -- 2. shapes every reader can build -----------------------------------------------------

@pytest.mark.parametrize(("shape", "dtype"), [
    ([0, 2**64], "F32"),
    ([2**64, 0], "U8"),
    ([0, 2**63], "U8"),
    ([0, 2**62, 2**62], "F32"),  # nothing to hold, but torch's strides overflow
    ([0, 2**62], "F32"),  # 2**62 elements of 4 bytes: the byte count overflows
])
def test_empty_shape_beyond_int64_is_refused(tmp_path: Path, shape: list[int], dtype: str) -> None:
    path = write_raw_safetensors(
        tmp_path / "model.safetensors", {"w": {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}}
    )
    with pytest.raises(InvalidCheckpointError, match=r"model.safetensors: tensor 'w': shape .* int64"):
        open_checkpoint(path)


def test_shape_whose_bytes_overflow_int64_is_refused_for_its_shape(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 2**66]}}
    path = write_raw_safetensors(tmp_path / "model.safetensors", header)
    with pytest.raises(InvalidCheckpointError, match=r"tensor 'w': shape \[4294967296, 4294967296\].*int64"):
        open_checkpoint(path)


def test_largest_empty_shape_torch_can_build_is_accepted_and_read(tmp_path: Path) -> None:
    header = {"w": {"dtype": "U8", "shape": [0, 2**63 - 1], "data_offsets": [0, 0]}}
    with open_checkpoint(write_raw_safetensors(tmp_path / "model.safetensors", header)) as checkpoint:
        tensor = checkpoint.read("w")
    assert tensor.shape == (0, 2**63 - 1) and tensor.dtype == torch.uint8


def test_rank_over_the_limit_is_refused_at_parse_time(tmp_path: Path) -> None:
    """torch's cost grows with the square of the rank: 10**5 ones took 50 s to reshape."""
    limit = safetensors_format.MAX_RANK
    ok = {"w": {"dtype": "F32", "shape": [1] * limit, "data_offsets": [0, 4]}}
    raw = json.dumps(ok).encode()
    assert parse_header(raw, file_size=8 + len(raw) + 4, path=tmp_path / "x.safetensors").tensors["w"].numel == 1
    raw = json.dumps({"w": {"dtype": "F32", "shape": [1] * 100_000, "data_offsets": [0, 4]}}).encode()
    with pytest.raises(InvalidCheckpointError, match=rf"tensor 'w': shape has 100000 dimensions.*limit of {limit}"):
        parse_header(raw, file_size=8 + len(raw) + 4, path=tmp_path / "x.safetensors")


def test_integer_past_pythons_digit_limit_is_a_checkpoint_error(tmp_path: Path) -> None:
    raw = b'{"w": {"dtype": "F32", "shape": [' + b"1" * 5000 + b'], "data_offsets": [0, 4]}}'
    with pytest.raises(InvalidCheckpointError, match=r"x\.safetensors: header holds a number"):
        parse_header(raw, file_size=8 + len(raw) + 4, path=tmp_path / "x.safetensors")
    directory = sharded(tmp_path)
    (directory / "model.safetensors.index.json").write_text('{"weight_map": {}, "n": ' + "1" * 5000 + "}")
    with pytest.raises(InvalidCheckpointError, match=r"index\.json: index JSON holds a value"):
        open_checkpoint(directory)


def test_message_for_a_huge_malformed_shape_stays_short(tmp_path: Path) -> None:
    raw = json.dumps({"w": {"dtype": "F32", "shape": [1] * 100_000 + [-1], "data_offsets": [0, 4]}}).encode()
    with pytest.raises(InvalidCheckpointError, match="not a list of non-negative integers") as info:
        parse_header(raw, file_size=8 + len(raw) + 4, path=tmp_path / "x.safetensors")
    assert len(str(info.value)) < 400


# -- 3. bounded tensor counts -------------------------------------------------------------

def zero_size_header(count: int, metadata: bool = False) -> bytes:
    header: dict[str, Any] = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(count)}
    if metadata:
        header["__metadata__"] = {"format": "pt"}
    return json.dumps(header).encode()


def test_header_over_the_tensor_limit_is_refused_with_file_count_and_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(safetensors_format, "MAX_TENSORS", 10)
    raw = zero_size_header(10, metadata=True)  # the metadata is not a tensor
    assert len(parse_header(raw, file_size=8 + len(raw), path=tmp_path / "ok.safetensors").tensors) == 10
    path = write_raw_safetensors(tmp_path / "model.safetensors", zero_size_header(25))
    with pytest.raises(InvalidCheckpointError) as info:
        open_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path}: header lists 25 tensors, over the limit of 10"), message
    assert "\n" not in message


def test_a_flood_of_entries_or_objects_is_refused_before_the_json_is_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(safetensors_format, "MAX_TENSORS", 10)

    def no_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the header was parsed before its size in entries was checked")

    monkeypatch.setattr(safetensors_format.json, "loads", no_parse)
    entries = write_raw_safetensors(tmp_path / "entries.safetensors", zero_size_header(25))
    with pytest.raises(InvalidCheckpointError, match="header lists 25 tensors, over the limit of 10"):
        open_checkpoint(entries)
    objects = write_raw_safetensors(tmp_path / "objects.safetensors", b'{"a": [' + b",".join([b"{}"] * 30) + b"]}")
    with pytest.raises(InvalidCheckpointError, match="header holds 31 JSON objects or more"):
        open_checkpoint(objects)


def test_tensor_limit_is_checked_before_any_entry_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(safetensors_format, "MAX_TENSORS", 10)

    def no_entries(*args: object) -> None:
        raise AssertionError("an entry was parsed before the count was checked")

    monkeypatch.setattr(safetensors_format, "_parse_entry", no_entries)
    raw = zero_size_header(11)
    with pytest.raises(InvalidCheckpointError, match="11 tensors, over the limit of 10"):
        parse_header(raw, file_size=8 + len(raw), path=tmp_path / "x.safetensors")


def test_objects_nested_past_the_limit_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safetensors_format, "MAX_TENSORS", 10)
    raw = json.dumps({"w": {"dtype": "F32", "shape": [], "data_offsets": [0, 4], "x": [{}] * 30}}).encode()
    with pytest.raises(InvalidCheckpointError, match=r"x.safetensors: header holds 3\d JSON objects.*10 tensors"):
        parse_header(raw, file_size=8 + len(raw) + 4, path=tmp_path / "x.safetensors")


def test_inspect_totals_on_a_header_over_the_limit_prints_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(safetensors_format, "MAX_TENSORS", 10)
    path = write_raw_safetensors(tmp_path / "model.safetensors", zero_size_header(11))
    result = CliRunner().invoke(app, ["inspect", str(path), "--totals"])
    assert result.exit_code != 0
    assert "header lists 11 tensors, over the limit of 10" in result.output.replace("\n", "")
    assert "Traceback" not in result.output


def test_index_over_its_limits_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = sharded(tmp_path)
    index = directory / "model.safetensors.index.json"
    where = re.escape(str(index))
    monkeypatch.setattr(layout, "MAX_INDEX_TENSORS", 3)
    with pytest.raises(InvalidCheckpointError, match=rf"{where}: index lists 4 tensors, over the limit of 3"):
        open_checkpoint(directory)
    monkeypatch.setattr(layout, "MAX_INDEX_TENSORS", 10)
    monkeypatch.setattr(layout, "MAX_INDEX_BYTES", 50)
    size = index.stat().st_size
    with pytest.raises(InvalidCheckpointError, match=rf"{where}: index is {size} bytes, over the 50-byte limit"):
        open_checkpoint(directory)


def test_header_byte_limit_holds_for_headers_given_directly(tmp_path: Path) -> None:
    raw = b" " * (safetensors_format.MAX_HEADER_BYTES + 1)
    with pytest.raises(InvalidCheckpointError, match="over the 100000000-byte limit"):
        parse_header(raw, file_size=8 + len(raw), path=tmp_path / "x.safetensors")
    assert struct.calcsize("<Q") == 8  # the length prefix parse_header's file_size counts


def test_the_pickle_refusal_points_to_the_tools_own_lossless_converter(tmp_path: Path) -> None:
    from mergekit_like.errors import UnsafeCheckpointError
    from mergekit_like.io import open_checkpoint

    torch.save({"transformer.h.0.w": torch.ones(2), "lm_head.weight": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError) as refused:
        open_checkpoint(tmp_path)
    assert "mergekit-like convert DIR DIR-st --allow-pickle" in str(refused.value)
    assert "AutoModel" not in str(refused.value)
