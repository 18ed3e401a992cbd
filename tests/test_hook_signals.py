"""A trainer killed, interrupted or stopped: the sidecar saves the averages it holds and exits, within a bound.

Each trainer is a child Python in a session of its own, so that a signal to its process group
reaches its sidecar as Ctrl-C or a scheduler's stop would, and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

BOUND = 30.0  # seconds a sidecar may take to save and exit once its trainer is gone or told to stop
CHILD_TIMEOUT = 180  # seconds a child Python (torch import, sidecar start) may take on a loaded machine

# Imported by the trainer and by its sidecar (the child's PYTHONPATH holds the test's directory).
SLOW_AVERAGES = """
import time
from mergekit_like.hook import EMA

class SlowEMA(EMA):
    '''An EMA whose folds take seconds: a strict trainer waits for the sidecar while it folds.'''

    def update(self, snapshot, step):
        time.sleep(3)
        return super().update(snapshot, step)
"""

# Steps until killed; prints "pid <sidecar pid>", then "step N" after each snapshot the sidecar has taken.
TRAINER = """
import sys, time, torch
from mergekit_like.hook import WeightAveraging, EMA
from slow_averages import SlowEMA

if __name__ == "__main__":
    out, kind = sys.argv[1], sys.argv[2]
    model = torch.nn.Linear(3, 2)
    average = SlowEMA(0.5) if kind == "slow" else EMA(0.5)  # kind: "slow" or "fast"
    hook = WeightAveraging(model, [average], out_dir=out, strict=True)
    hook._sidecar._spawner.join()  # the sidecar process exists; it imports torch for seconds before it runs
    print("pid", hook._sidecar.process.pid, flush=True)
    assert hook.wait_until_ready(timeout=120)
    while True:
        with torch.no_grad():
            model.weight.add_(1.0)
        hook.step()
        if kind != "slow":
            assert hook.wait_until_ready(timeout=120)  # the snapshot is folded: the step is the sidecar's
        print("step", hook.step_count, flush=True)
        time.sleep(0.05)
"""


def start_trainer(tmp_path: Path, kind: str) -> subprocess.Popen[str]:
    (tmp_path / "slow_averages.py").write_text(SLOW_AVERAGES)
    (tmp_path / "train.py").write_text(TRAINER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(tmp_path / "train.py"), str(tmp_path / "avg"), kind],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def read_line(trainer: subprocess.Popen[str], prefix: str) -> int:
    """The number after ``prefix`` on the trainer's next line of that kind."""
    assert trainer.stdout is not None
    deadline = time.monotonic() + CHILD_TIMEOUT
    while time.monotonic() < deadline:
        line = trainer.stdout.readline()
        if not line:
            err = trainer.stderr.read() if trainer.stderr else ""
            pytest.fail(f"the trainer ended before it said {prefix!r}: {err}")
        word, _, number = line.strip().partition(" ")
        if word == prefix:
            return int(number)
    pytest.fail(f"the trainer did not say {prefix!r} within {CHILD_TIMEOUT} s")


def sidecar_pid(trainer: subprocess.Popen[str]) -> int:
    return read_line(trainer, "pid")


def exited(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state == "Z"  # a zombie has exited; its parent, the dead trainer, will never reap it


def wait_until_exited(pid: int, what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not exited(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"{what} did not exit within {BOUND} s")
        time.sleep(0.1)


def saved(tmp_path: Path) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((tmp_path / "avg" / "ema_0.5" / "state" / "state.json").read_text())
    return state


def finish(trainer: subprocess.Popen[str]) -> str:
    try:
        _, err = trainer.communicate(timeout=BOUND)
    except subprocess.TimeoutExpired:
        os.killpg(trainer.pid, signal.SIGKILL)
        trainer.communicate()
        pytest.fail(f"the trainer did not exit within {BOUND} s")
    return err


def test_a_strict_trainer_killed_while_it_waits_for_a_fold_leaves_a_sidecar_that_saves_and_exits(
        tmp_path: Path) -> None:
    trainer = start_trainer(tmp_path, "slow")
    sidecar = sidecar_pid(trainer)
    step = read_line(trainer, "step")  # the second step() then waits for the slow fold of the first
    time.sleep(1.0)
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.wait(timeout=BOUND)  # not communicate(): a hung sidecar would keep the trainer's stdout open
    wait_until_exited(sidecar, "the sidecar of a trainer killed while it waited")
    assert saved(tmp_path)["last_step"] >= step
    assert (tmp_path / "avg" / "ema_0.5" / "latest").is_symlink()


def test_ctrl_c_ends_the_run_with_the_last_averages_saved(tmp_path: Path) -> None:
    trainer = start_trainer(tmp_path, "fast")
    sidecar = sidecar_pid(trainer)
    read_line(trainer, "step")
    step = read_line(trainer, "step")
    os.killpg(trainer.pid, signal.SIGINT)  # Ctrl-C: the whole process group
    err = finish(trainer)
    assert "KeyboardInterrupt" in err
    wait_until_exited(sidecar, "the sidecar after Ctrl-C")
    state = saved(tmp_path)
    assert state["last_step"] >= step  # the snapshots up to the interrupt, not fewer
    assert (tmp_path / "avg" / "ema_0.5" / f"step_{state['last_step']}").is_dir()


def test_ctrl_c_while_the_sidecar_starts_does_not_kill_it_unsaved_or_hang(tmp_path: Path) -> None:
    trainer = start_trainer(tmp_path, "fast")
    sidecar_pid(trainer)  # the sidecar is spawned and imports torch now
    os.killpg(trainer.pid, signal.SIGINT)
    err = finish(trainer)  # the trainer's close() waits for the starting sidecar, which answers and exits
    assert "not running" not in err and "died" not in err, err  # what close() says of a sidecar killed
    assert not list(tmp_path.glob("avg/**/step_*"))  # no snapshot was taken, so none is saved


def test_sigterm_to_the_process_group_saves_the_averages_before_the_sidecar_exits(tmp_path: Path) -> None:
    trainer = start_trainer(tmp_path, "fast")
    sidecar = sidecar_pid(trainer)
    read_line(trainer, "step")
    step = read_line(trainer, "step")
    os.killpg(trainer.pid, signal.SIGTERM)  # a scheduler's stop: the trainer dies without close()
    finish(trainer)
    assert trainer.returncode == -signal.SIGTERM
    wait_until_exited(sidecar, "the sidecar after SIGTERM")
    assert saved(tmp_path)["last_step"] >= step


def test_the_sidecar_is_named_for_ps_and_pgrep(tmp_path: Path) -> None:
    trainer = start_trainer(tmp_path, "fast")
    try:
        sidecar = sidecar_pid(trainer)
        read_line(trainer, "step")
        assert Path(f"/proc/{sidecar}/comm").read_text().strip() == "mkl-sidecar"
    finally:
        os.killpg(trainer.pid, signal.SIGKILL)
        trainer.communicate()
