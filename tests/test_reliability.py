"""Runs that die, disks that fill, concurrent runs, and `verify`."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest
import torch
from helpers import write_checkpoint
from mergekit_like.cli.main import app, main
from typer.testing import CliRunner

from mergekit_like.errors import OutputLockedError, OutputWriteError
from mergekit_like.io import atomic_directory, convert_checkpoint
from mergekit_like.io.checksums import CHECKSUMS
from mergekit_like.io.verify import verify_checkpoint

runner = CliRunner()


def two_models(tmp_path: Path, rows: int = 64) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    return [write_checkpoint(tmp_path / name, {f"w{i}": torch.randn(rows, 256, generator=g) for i in range(8)},
                             config={"model_type": "llama"}) for name in ("a", "b")]


def merge_args(models: list[Path], out: Path, weights: str = "1,1") -> list[str]:
    return ["merge", "--method", "linear", *map(str, models), "-p", f"weight={weights}", "-o", str(out), "-q"]


def _run_cli(argv: list[str], stderr_path: str | None = None) -> None:
    """``mergekit-like ARGV`` in a child process of the fork server (its exit code is the CLI's)."""
    if stderr_path is not None:
        os.dup2(os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    torch.set_num_threads(1)  # starting a thread pool per child costs more than these tiny merges
    sys.argv = ["mergekit-like", *argv]
    main()


@pytest.fixture(scope="module")
def cli_processes() -> Iterator[ForkServerContext]:
    """Fresh CLI processes without paying torch's 2 s import for each.

    A fork server imports the CLI once, before any torch op (so no OpenMP pool is forked),
    and forks a clean child per run: a real process that can be SIGKILLed, 50x cheaper
    than a new interpreter.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["mergekit_like.cli.main", __name__])
    yield context


def start_cli(context: ForkServerContext, argv: list[str], stderr_path: Path | None = None) -> BaseProcess:
    process = context.Process(target=_run_cli, args=(argv, None if stderr_path is None else str(stderr_path)))
    process.start()
    return process


# -- verify -------------------------------------------------------------------------


def test_verify_passes_a_fresh_output_and_catches_a_flipped_byte(tmp_path: Path) -> None:
    models = two_models(tmp_path)
    assert runner.invoke(app, merge_args(models, tmp_path / "m")).exit_code == 0
    assert (tmp_path / "m" / CHECKSUMS).exists()
    result = runner.invoke(app, ["verify", str(tmp_path / "m"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["checksums"] == "ok" and report["tensors"] == 8
    shard = tmp_path / "m" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the last tensor's data: the header stays valid
    shard.write_bytes(bytes(data))
    result = runner.invoke(app, ["verify", str(tmp_path / "m")])
    assert result.exit_code == 1 and "sha256 differs" in result.output


def test_verify_reports_nan_and_inf_with_the_tensor(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "c", {"ok": torch.ones(3), "bad": torch.tensor([1.0, float("nan"), float("inf")])})
    report = verify_checkpoint(path)
    assert not report.ok and any("tensor 'bad': 2 NaN or infinite values" in p for p in report.problems)
    assert verify_checkpoint(path, check_finite=False).ok


def test_verify_reports_structural_problems(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "c", {"w": torch.ones(4)})
    (path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:-4])
    result = runner.invoke(app, ["verify", str(path)])
    assert result.exit_code == 1 and "truncated" in result.output


def test_merge_check_finite_names_the_tensor_and_model(tmp_path: Path) -> None:
    a, b = two_models(tmp_path)
    bad = write_checkpoint(tmp_path / "bad", {f"w{i}": torch.full((64, 256), float("nan")) for i in range(8)})
    result = runner.invoke(app, merge_args([a, bad], tmp_path / "m")[:-1] + ["--check-finite"])
    assert result.exit_code == 2 and "tensor 'w0': 16384 NaN or infinite values in model" in result.output
    assert not (tmp_path / "m").exists()


# -- concurrent runs ------------------------------------------------------------------


def test_a_second_run_into_the_same_target_is_refused(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src", {"w": torch.ones(4)})
    with atomic_directory(tmp_path / "out") as temp:
        (temp / "x").write_text("first run, still writing")
        with pytest.raises(OutputLockedError, match="another run is writing this output"):
            convert_checkpoint(source, tmp_path / "out")
    assert (tmp_path / "out" / "x").read_text() == "first run, still writing"
    assert not list(tmp_path.glob(".out.lock"))  # released and removed


def test_a_second_cli_merge_while_the_lock_is_held_exits_2_and_touches_nothing(
    tmp_path: Path, cli_processes: ForkServerContext
) -> None:
    models = two_models(tmp_path, rows=4)
    target = tmp_path / "out"
    # The lock a first run holds while it writes (io/atomic.py): flock on .NAME.lock beside the target.
    with open(tmp_path / ".out.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        second = start_cli(cli_processes, merge_args(models, target), tmp_path / "stderr.txt")
        second.join(60)
    assert second.exitcode == 2
    message = (tmp_path / "stderr.txt").read_text()
    assert "another run is writing this output now" in message and str(target) in message
    assert not target.exists() and not list(tmp_path.glob(".out.tmp-*"))


# -- runs that die --------------------------------------------------------------------


def shard_bytes(target: Path) -> bytes | None:
    """The output's weights, or None when there is no output; a present output must verify."""
    if not target.exists():
        return None
    assert verify_checkpoint(target).ok  # every file whole: the checksum manifest matches
    return (target / "model.safetensors").read_bytes()


def run_to_completion(context: ForkServerContext, argv: list[str]) -> float:
    started = time.perf_counter()
    process = start_cli(context, argv)
    process.join(60)
    assert process.exitcode == 0
    return time.perf_counter() - started


# Fractions of an uninterrupted run: early (reading), middle (writing shards), late (manifest,
# side files, fsync, the rename into place and removing the old output). Some runs start with
# no output at all, the others replace a complete previous one.
KILL_POINTS = [(0.1, False), (0.35, True), (0.6, False), (0.8, False), (0.9, True), (0.97, False), (0.995, False)]


def test_sigkill_at_moments_over_the_whole_run_leaves_the_old_output_or_nothing(
    tmp_path: Path, cli_processes: ForkServerContext
) -> None:
    models = two_models(tmp_path, rows=256)  # 2 MB per model: a run is mostly fixed costs
    target = tmp_path / "out"
    versions = {w: [*merge_args(models, target, w), "--overwrite"] for w in ("1,1", "1,3")}
    expected: dict[str, bytes | None] = {}
    durations = []
    for weights, argv in versions.items():
        durations.append(run_to_completion(cli_processes, argv))
        expected[weights] = shard_bytes(target)
    duration = min(durations)
    assert expected["1,1"] != expected["1,3"]  # so a kill shows which version survived
    for i, (fraction, start_absent) in enumerate(KILL_POINTS):
        weights = ("1,1", "1,3")[i % 2]
        if start_absent:
            shutil.rmtree(target)
        previous = shard_bytes(target)
        for _ in range(8):
            process = start_cli(cli_processes, versions[weights])
            started = time.perf_counter()
            process.join(fraction * duration)
            if process.is_alive():
                break
            # Faster than the measured runs (a shared CPU varies), it finished whole: aim earlier.
            assert process.exitcode == 0
            duration = min(duration, time.perf_counter() - started) * 0.95
            previous = shard_bytes(target)
        assert process.is_alive(), f"the run ended before the kill point {fraction}"
        process.kill()
        process.join()
        assert shard_bytes(target) in (previous, expected[weights]), f"kill point {fraction}"
        # The next run restores or removes what the killed one left, and completes.
        run_to_completion(cli_processes, versions[weights])
        assert shard_bytes(target) == expected[weights]
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# -- full disks -------------------------------------------------------------------------


@pytest.fixture
def tiny_filesystem(tmp_path: Path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_full_disk_says_no_space_with_the_path_and_leaves_nothing(tmp_path: Path, tiny_filesystem: Path) -> None:
    source = write_checkpoint(tmp_path / "src", {"w": torch.randn(1024, 512)})  # 2 MB on a 1 MB disk
    with pytest.raises(OutputWriteError, match=r"small/\.out\.tmp-.*model\.safetensors: no space left"):
        convert_checkpoint(source, tiny_filesystem / "out")
    assert list(tiny_filesystem.iterdir()) == []


def test_file_size_limit_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src", {"w": torch.randn(1024, 512)})
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))\n"
        "from mergekit_like.cli.main import main\n"
        "sys.argv = ['mergekit-like', 'convert', sys.argv[1], '-o', sys.argv[2], '-q']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(source), str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "model.safetensors" in done.stderr and ("file size limit" in done.stderr or "no space" in done.stderr)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
