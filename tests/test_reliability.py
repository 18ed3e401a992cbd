"""Runs that die, disks that fill, concurrent runs, and `verify`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import write_checkpoint
from mergekit_like.cli.main import app
from mergekit_like.errors import OutputLockedError, OutputWriteError
from mergekit_like.io import atomic_directory, convert_checkpoint
from mergekit_like.io.checksums import CHECKSUMS
from mergekit_like.io.verify import verify_checkpoint

runner = CliRunner()


def two_models(tmp_path: Path, rows: int = 64) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    return [write_checkpoint(tmp_path / name, {f"w{i}": torch.randn(rows, 256, generator=g) for i in range(8)},
                             config={"model_type": "llama"}) for name in ("a", "b")]


def merge_args(models: list[Path], out: Path) -> list[str]:
    return ["merge", "--method", "linear", *map(str, models), "-p", "weight=1,1", "-o", str(out), "-q"]


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


# -- runs that die --------------------------------------------------------------------


def complete_or_absent(target: Path) -> str:
    if not target.exists():
        return "absent"
    assert verify_checkpoint(target).ok
    return "complete"


@pytest.mark.parametrize("kill_after", [0.0, 0.05, 0.15, 0.4])
def test_sigkill_at_any_moment_leaves_the_old_target_or_nothing(tmp_path: Path, kill_after: float) -> None:
    models = two_models(tmp_path, rows=4096)  # 32 MB per model: the merge takes a while
    target = tmp_path / "out"
    args = [sys.executable, "-c", "from mergekit_like.cli.main import main; main()",
            *merge_args(models, target), "--overwrite"]
    if kill_after >= 0.15:  # half the cases start from a previous complete output
        assert subprocess.run(args, capture_output=True).returncode == 0
    previous = (target / "model.safetensors").read_bytes() if target.exists() else None
    process = subprocess.Popen(args)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.tmp-*")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # wait until the run is writing
    time.sleep(kill_after)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = complete_or_absent(target)
    if previous is not None:
        # The old output survives whole, or the new one replaced it whole; never a mix.
        assert state == "complete"
        assert (target / "model.safetensors").read_bytes() == previous
    # The next run cleans up what the killed one left and completes.
    assert subprocess.run(args, capture_output=True).returncode == 0
    assert verify_checkpoint(target).ok
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
