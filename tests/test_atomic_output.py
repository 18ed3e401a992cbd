"""Outputs appear whole or not at all; an existing target survives every failure."""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from helpers import write_checkpoint

from mergekit_like.errors import OutputExistsError, OutputWriteError
from mergekit_like.io import ShardedWriter, TensorSpec, atomic, atomic_directory, convert_checkpoint, open_checkpoint
from mergekit_like.io.atomic import OLD_MARK, TEMP_MARK, stale_temporaries


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


# -- a kill between the two renames of a replacement (the fallback without RENAME_EXCHANGE) --


def test_a_kill_between_the_renames_never_loses_the_previous_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "w").write_text("previous")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # the swap by two renames
    real_rename = os.rename

    def killed_before_moving_in(src: str | Path, dst: str | Path) -> None:
        if Path(dst) == target and TEMP_MARK in Path(src).name:
            os.kill(os.getpid(), signal.SIGKILL)  # nothing runs after this, as in a real kill
        real_rename(src, dst)

    pid = os.fork()
    if pid == 0:  # the child: a run that replaces the target and dies halfway
        try:
            monkeypatch.setattr(os, "rename", killed_before_moving_in)
            with atomic_directory(target, overwrite=True) as temp:
                (temp / "w").write_text("new")
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    assert not target.exists()
    # What the kill left: the previous output moved aside under the dead run's pid, no target.
    assert any(p.name.startswith(f".out{OLD_MARK}{pid}-") for p in stale_temporaries(target))
    # The next run puts the previous output back, says so, and refuses to replace it unasked.
    with caplog.at_level(logging.WARNING, logger=atomic.__name__):
        with pytest.raises(OutputExistsError, match="not empty"):
            with atomic_directory(target):
                pass
    assert (target / "w").read_text() == "previous"
    assert "restored" in caplog.text and str(target) in caplog.text
    assert leftovers(tmp_path) == []
    with atomic_directory(target, overwrite=True) as temp:
        (temp / "w").write_text("new")
    assert (target / "w").read_text() == "new" and leftovers(tmp_path) == []


def test_a_backup_is_removed_once_the_new_output_is_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill after the new output moved in leaves a backup beside a complete target: not restored."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "w").write_text("new")
    dead_pid = 2**22 + 12345
    monkeypatch.setattr(os, "getpid", lambda: dead_pid)
    backup = atomic._temp_name(target, OLD_MARK)  # named exactly as the code names it
    monkeypatch.undo()
    backup.mkdir()
    (backup / "w").write_text("previous")
    with atomic_directory(target, overwrite=True) as temp:
        (temp / "w").write_text("newer")
    assert (target / "w").read_text() == "newer" and leftovers(tmp_path) == []


def test_replacing_a_target_swaps_both_directories_in_one_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    if not atomic._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert (b / "x").exists() and not (a / "x").exists()

    def must_not_run(temp: Path, target: Path) -> None:
        raise AssertionError("fell back to two renames")

    monkeypatch.setattr(atomic, "_swap_by_two_renames", must_not_run)
    with atomic_directory(b, overwrite=True) as temp:
        (temp / "y").write_text("new")
    assert sorted(p.name for p in b.iterdir()) == ["y"] and leftovers(tmp_path) == []


def test_the_two_rename_fallback_replaces_a_target_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target, overwrite=True) as temp:
        (temp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"] and leftovers(tmp_path) == []


# -- out of space outside the shard data: manifest, side files, fsync, renames --------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_out_of_space_anywhere_in_the_block_is_an_output_write_error(tmp_path: Path, code: int) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    words = r"file size limit exceeded.*ulimit -f" if code == errno.EFBIG else r"no space left on device.*free space"
    with pytest.raises(OutputWriteError, match=rf"(?i)config\.json: {words}") as info:
        with atomic_directory(target, overwrite=True) as temp:
            (temp / "model.safetensors").write_bytes(b"written")
            raise OSError(code, os.strerror(code), str(temp / "config.json"))
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == code
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert leftovers(tmp_path) == []


def test_out_of_space_while_flushing_names_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(root: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")  # os.fsync names no file

    monkeypatch.setattr(atomic, "fsync_tree", full)
    target = tmp_path / "out"
    with pytest.raises(OutputWriteError, match=rf"^{re.escape(str(target))}: no space left on device"):
        with atomic_directory(target) as temp:
            (temp / "x").write_text("x")
    assert not target.exists() and leftovers(tmp_path) == []


# -- other refusals: permissions, read-only file systems ---------------------------------------


@pytest.mark.parametrize(("code", "words", "fix"), [
    (errno.EACCES, "permission denied", "writable for this user, or write the output elsewhere"),
    (errno.EPERM, "operation not permitted", "writable for this user, or write the output elsewhere"),
    (errno.EROFS, "read-only file system", "write the output to a writable file system"),
])
def test_other_os_errors_about_the_output_are_output_write_errors(
    tmp_path: Path, code: int, words: str, fix: str
) -> None:
    with pytest.raises(OutputWriteError) as info:
        with atomic_directory(tmp_path / "out") as temp:
            raise OSError(code, os.strerror(code), str(temp / "config.json"))
    assert re.fullmatch(rf"{re.escape(str(tmp_path))}/\.out\.tmp-[^/]+/config\.json: {words}\. .*{fix}; "
                        r"nothing partial was kept\.", str(info.value), flags=re.IGNORECASE), str(info.value)
    assert info.value.errno == code and isinstance(info.value.__cause__, OSError)
    assert leftovers(tmp_path) == []


def test_os_errors_about_other_files_pass_through_unchanged(tmp_path: Path) -> None:
    # An input the block reads is the caller's to describe (the CLI names it); it is not the output's.
    with pytest.raises(PermissionError) as info:
        with atomic_directory(tmp_path / "out"):
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "model-a" / "model.safetensors"))
    assert not isinstance(info.value, OutputWriteError) and leftovers(tmp_path) == []


def test_a_lock_that_cannot_be_created_is_an_output_write_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def refused(path: object, flags: int, *args: object) -> int:
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refused)
    with pytest.raises(OutputWriteError, match=rf"^{re.escape(str(tmp_path / '.out.lock'))}: permission denied\. "
                                               rf"Make {re.escape(str(tmp_path))} writable"):
        with atomic_directory(tmp_path / "out"):
            pass
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()
