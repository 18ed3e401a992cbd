"""Outputs appear whole or not at all; an existing target survives every failure."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from helpers import write_checkpoint
from mergekit_like.errors import OutputExistsError, OutputWriteError
from mergekit_like.io import ShardedWriter, TensorSpec, atomic_directory, convert_checkpoint, open_checkpoint
from mergekit_like.io.atomic import stale_temporaries


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_output_exists_without_overwrite_is_refused_before_any_work(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "src", {"w": torch.ones(3)})
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match=r"out: exists and is not empty.*--overwrite"):
        convert_checkpoint(src, target)
    assert (target / "keep.txt").read_text() == "precious"
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_only_once_complete(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "src", {"w": torch.ones(3)})
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    convert_checkpoint(src, target, overwrite=True)
    assert not (target / "old.txt").exists()
    with open_checkpoint(target) as ckpt:
        assert torch.equal(ckpt.read("w"), torch.ones(3))
    assert leftovers(tmp_path) == []


def test_empty_existing_directory_is_used(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "src", {"w": torch.ones(3)})
    (tmp_path / "out").mkdir()
    convert_checkpoint(src, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_interrupted_write_leaves_nothing_behind_and_old_target_intact(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    specs = [TensorSpec("a", torch.float32, (4,)), TensorSpec("b", torch.float32, (4,))]
    with pytest.raises(type(error)):
        with atomic_directory(target, overwrite=True) as temp:
            with ShardedWriter(temp, specs) as writer:
                writer.write("a", torch.ones(4))
                raise error
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert leftovers(tmp_path) == []


def test_disk_full_is_reported_with_the_path_and_nothing_partial_remains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_checkpoint(tmp_path / "src", {"a": torch.ones(64), "b": torch.ones(64)})
    real_pwrite = os.pwrite
    calls = {"n": 0}

    def full_disk(fd: int, data, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(OutputWriteError, match=r"(?i)model.safetensors.*no space left.*free space"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_writer_refuses_tensors_that_do_not_match_the_plan(tmp_path: Path) -> None:
    from mergekit_like.errors import TensorWriteError

    writer = ShardedWriter(tmp_path, [TensorSpec("a", torch.float32, (2,))])
    with pytest.raises(TensorWriteError, match="tensor 'a': got torch.float16"):
        writer.write("a", torch.ones(2, dtype=torch.float16))
    with pytest.raises(TensorWriteError, match="tensor 'z': is not in the output plan"):
        writer.write("z", torch.ones(2))
    with pytest.raises(TensorWriteError, match="tensor 'a': was planned but never written"):
        writer.close()


def test_stale_temporaries_of_a_dead_process_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "out"
    dead_pid = 2**22 + 12345  # above pid_max's default; no such process
    stale = tmp_path / f".out.tmp-{dead_pid}-abcd1234"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / f".out.tmp-{os.getpid()}-abcd1234"
    live.mkdir()
    assert stale_temporaries(target) == [stale]
    with atomic_directory(target) as temp:
        (temp / "x").write_text("x")
    assert not stale.exists() and live.exists()
    assert (target / "x").read_text() == "x"


def test_target_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("file")
    with pytest.raises(OutputExistsError, match="not a directory"):
        with atomic_directory(tmp_path / "out", overwrite=True):
            pass
