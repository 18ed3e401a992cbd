"""A wrong request, a dead or a slow sidecar: the trainer gets an error or a restart, never a hang.

Every call under test runs in a thread joined with a deadline, so a regression fails
the test instead of blocking the suite.
"""

from __future__ import annotations

import os
import signal
import struct
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from mergekit_like.errors import AveragesNotSavedError, HookUsageError, SidecarError, UnknownAverageError
from mergekit_like.hook import EMA, SFA, SWA, WeightAveraging
from mergekit_like.io import open_checkpoint

T = TypeVar("T")
BOUND = 20.0  # seconds any call here may take; a sidecar restart takes a few
PIPE_BUFFER = 64 * 1024  # Linux's default pipe capacity
MANY = 3000  # tensors: an average's answer, an entry per tensor, is then several times PIPE_BUFFER
SEND_BYTES = Connection._send_bytes  # as imported, before DiesMidAnswerEMA replaces it in a sidecar


def within(seconds: float, call: Callable[[], T]) -> T:
    """``call()``'s result or exception, failing the test if it has not returned after ``seconds``."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"the call did not return within {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def trained_hook(tmp_path: Path, averages: list[Any] | None = None, **options: Any) -> WeightAveraging:
    model = torch.nn.Linear(3, 2)
    hook = WeightAveraging(model, averages or [EMA(0.9)], out_dir=tmp_path / "avg", **options)
    assert within(BOUND, hook.wait_until_ready)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        hook.step()
    return hook


def kill(hook: WeightAveraging) -> None:
    hook._sidecar.process.kill()
    hook._sidecar.process.join(BOUND)


def kill_before_it_runs(hook: WeightAveraging) -> None:
    """SIGKILL for a sidecar that is spawned but has not started (it is restoring its state)."""
    link = hook._sidecar
    link._spawner.join(BOUND)  # the process exists
    assert not link.started.is_set()
    kill(hook)


# A sidecar started while this is set has a SlowEMA that is slow (the environment is the
# parent's at spawn): a test unsets it before a kill, and the restarted sidecar's final save
# at close() then takes no time.
SLOW_RESULT = "MERGEKIT_LIKE_TEST_SLOW_RESULT"


class SlowEMA(EMA):
    """An EMA whose result takes far longer than any test: the sidecar is busy when it is killed."""

    def result(self) -> dict[str, torch.Tensor]:
        if os.environ.get(SLOW_RESULT):
            time.sleep(120)
        return super().result()


def write_part_then_die(connection: Connection, data: Any) -> None:
    """Connection._send_bytes for a sidecar killed halfway through a message larger than the pipe's buffer."""
    if len(data) <= PIPE_BUFFER:  # small messages (the answer to close, the fds shared) go as ever
        SEND_BYTES(connection, data)
        return
    # The header announces all of it; half a buffer of the body fits the pipe without waiting for the reader.
    os.write(connection.fileno(), struct.pack("!i", len(data)) + bytes(data[:PIPE_BUFFER // 2]))
    os.kill(os.getpid(), signal.SIGKILL)


class DiesMidAnswerEMA(EMA):
    """An EMA whose sidecar, asked for it, writes part of its answer and is killed (the OOM killer, say)."""

    def result(self) -> dict[str, torch.Tensor]:
        Connection._send_bytes = write_part_then_die  # type: ignore[method-assign]  # in the sidecar only
        return super().result()


def many_tensors() -> torch.nn.Module:
    return torch.nn.ParameterList(torch.nn.Parameter(torch.full((2,), float(i))) for i in range(MANY))


def sidecar_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("mergekit-like-sidecar")}


class SlowRestoreEMA(EMA):
    """An EMA whose restore takes far longer than any test: a restarted sidecar never gets to start."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        time.sleep(120)
        super().load_state_dict(state)


class FailingRestoreEMA(EMA):
    """An EMA whose saved state turns out unreadable after a while: a restarted sidecar is asked while it restores."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        time.sleep(1.0)
        raise ValueError("a corrupt state")


def test_a_wrong_label_is_an_error_in_the_caller_that_lists_the_labels(tmp_path: Path) -> None:
    hook = trained_hook(tmp_path, strict=True)
    with pytest.raises(UnknownAverageError, match=r"no average named 'ema'; this hook keeps: ema_0\.9"):
        within(BOUND, lambda: hook.averaged_state_dict("ema"))
    assert hook._sidecar.process.is_alive()
    assert within(BOUND, lambda: hook.averaged_state_dict("ema_0.9"))["weight"].shape == (2, 3)
    hook.close()


def test_an_average_without_a_snapshot_yet_is_an_answer_and_the_sidecar_stays_up(tmp_path: Path) -> None:
    hook = trained_hook(tmp_path, [EMA(0.9), SWA(start=100)], strict=True)
    with pytest.raises(HookUsageError, match="'swa_from100' holds no snapshot yet"):
        within(BOUND, lambda: hook.averaged_state_dict("swa_from100"))
    assert hook._sidecar.process.is_alive()
    assert "weight" in within(BOUND, lambda: hook.averaged_state_dict("ema_0.9"))
    hook.close()


def test_asking_a_dead_sidecar_is_an_error_and_a_restart(tmp_path: Path) -> None:
    hook = trained_hook(tmp_path, strict=True, save_every=1)
    saved = within(BOUND, lambda: hook.averaged_state_dict("ema_0.9"))
    kill(hook)
    with pytest.warns(UserWarning, match="sidecar died"), pytest.raises(SidecarError, match="a new one is starting"):
        within(BOUND, lambda: hook.averaged_state_dict("ema_0.9"))
    assert hook.counts.sidecar_restarts == 1
    assert within(BOUND, hook.wait_until_ready)
    restored = within(BOUND, lambda: hook.averaged_state_dict("ema_0.9"))  # from the state saved at step 3
    assert all(torch.equal(restored[n], saved[n]) for n in saved)
    hook.close()


def test_a_sidecar_killed_while_it_answers_gives_an_error_within_a_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SLOW_RESULT, "1")
    hook = trained_hook(tmp_path, [SlowEMA(0.9)], strict=True)
    killer = threading.Timer(1.0, hook._sidecar.process.kill)
    killer.start()
    started = time.monotonic()
    with pytest.warns(UserWarning, match="sidecar died"), \
            pytest.raises(SidecarError, match="died before it answered 'average'"):
        within(BOUND, lambda: hook.averaged_state_dict("ema_0.9"))
    assert time.monotonic() - started < BOUND
    assert hook.counts.sidecar_restarts == 1  # and a new sidecar is on its way
    killer.join()
    hook.close()


def test_a_sidecar_killed_halfway_through_an_answer_larger_than_the_pipe_gives_an_error_within_a_bound(
        tmp_path: Path) -> None:
    hook = WeightAveraging(many_tensors(), [DiesMidAnswerEMA(0.9)], out_dir=tmp_path / "avg", strict=True)
    assert within(BOUND, hook.wait_until_ready)
    hook.step()
    dying = hook._sidecar
    started = time.monotonic()
    with pytest.warns(UserWarning, match="sidecar died"), \
            pytest.raises(SidecarError, match="died before it answered 'average'; a new one is starting"):
        within(BOUND, lambda: hook.averaged_state_dict("ema_0.9"))
    assert time.monotonic() - started < BOUND
    assert dying.killed and hook.counts.sidecar_restarts == 1  # killed as arranged, and a new one is on its way
    dying._reader.join(BOUND)  # the reader of its answers found the pipe's end: no thread stays stuck in it
    assert not dying._reader.is_alive()
    within(BOUND, hook.close)


def test_an_answer_larger_than_the_pipe_arrives_whole_and_close_leaves_no_thread(tmp_path: Path) -> None:
    before = sidecar_threads()
    model = many_tensors()
    hook = WeightAveraging(model, [EMA(0.9)], out_dir=tmp_path / "avg", strict=True)
    assert within(BOUND, hook.wait_until_ready)
    hook.step()
    average = within(BOUND, lambda: hook.averaged_state_dict("ema_0.9"))
    expected = model.state_dict()
    assert average.keys() == expected.keys() and all(torch.equal(average[n], expected[n]) for n in expected)
    within(BOUND, hook.close)
    assert not sidecar_threads() - before


def test_a_slow_answer_is_given_up_after_the_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SLOW_RESULT, "1")
    hook = trained_hook(tmp_path, [SlowEMA(0.9)], strict=True)
    with pytest.raises(SidecarError, match="did not answer 'average' within 1 s"):
        within(BOUND, lambda: hook.averaged_state_dict("ema_0.9", timeout=1.0))
    monkeypatch.delenv(SLOW_RESULT)  # the sidecar started after the kill saves at once at close()
    kill(hook)  # rather than wait for its sleep
    started = time.monotonic()
    hook.close()
    assert time.monotonic() - started < BOUND


def test_step_after_the_sidecar_died_returns_at_once_and_skips_until_a_new_one_runs(tmp_path: Path) -> None:
    hook = trained_hook(tmp_path)
    kill(hook)
    started = time.monotonic()
    with pytest.warns(UserWarning, match="sidecar died"):
        hook.step()
    assert time.monotonic() - started < 0.5
    assert hook.counts.sidecar_restarts == 1 and hook.counts.skipped >= 1
    assert within(BOUND, hook.wait_until_ready)
    taken = hook.counts.taken
    hook.step()
    assert hook.counts.taken == taken + 1
    hook.close()


def test_a_strict_step_after_the_sidecar_died_waits_for_the_new_one_within_a_bound(tmp_path: Path) -> None:
    hook = trained_hook(tmp_path, strict=True)
    kill(hook)
    taken = hook.counts.taken
    with pytest.warns(UserWarning, match="sidecar died"):
        within(BOUND, hook.step)
    assert hook.counts.taken == taken + 1 and hook.counts.sidecar_restarts == 1
    hook.close()


def test_a_sidecar_that_cannot_start_is_an_error_naming_the_cause(tmp_path: Path) -> None:
    state = tmp_path / "avg" / "ema_0.9" / "state"
    state.mkdir(parents=True)
    (state / "state.json").write_text("{not json")
    hook = WeightAveraging(torch.nn.Linear(3, 2), [EMA(0.9)], out_dir=tmp_path / "avg")
    cause = r"exited before it started: .*state\.json: is not valid JSON"
    with pytest.raises(SidecarError, match=cause):
        within(BOUND, lambda: hook.wait_until_ready(timeout=BOUND))
    started = time.monotonic()
    with pytest.raises(SidecarError, match=cause):  # not restarted: it would fail the same way; the cause stays
        hook.step()
    assert time.monotonic() - started < 0.5 and hook.counts.sidecar_restarts == 0
    hook.close()


def test_asking_a_restarted_sidecar_whose_restore_fails_is_an_error_naming_the_cause(tmp_path: Path) -> None:
    hook = trained_hook(tmp_path, [FailingRestoreEMA(0.9)], strict=True, save_every=1)
    within(BOUND, lambda: hook.averaged_state_dict("ema_0.9"))  # saved: a restarted sidecar restores it
    kill(hook)
    with pytest.warns(UserWarning, match="sidecar died"), pytest.raises(SidecarError, match="a new one is starting"):
        within(BOUND, lambda: hook.averaged_state_dict("ema_0.9"))
    cause = r"exited before it started: .*is no state of ema_0\.9: a corrupt state"
    with pytest.raises(SidecarError, match=cause):  # asked while it restores: its report is the answer
        within(BOUND, lambda: hook.averaged_state_dict("ema_0.9"))
    with pytest.raises(SidecarError, match=cause):
        hook.step()
    assert hook.counts.sidecar_restarts == 1
    hook.close()


def test_a_sidecar_killed_before_it_ran_is_restarted_three_times_in_a_row_then_an_error(tmp_path: Path) -> None:
    hook = trained_hook(tmp_path, [SlowRestoreEMA(0.9)], save_every=1)
    within(BOUND, lambda: hook.averaged_state_dict("ema_0.9"))  # saved: a restarted sidecar restores it, slowly
    taken = hook.counts.taken
    kill(hook)
    with pytest.warns(UserWarning, match="sidecar died"):
        hook.step()
    for restarts in (2, 3):
        kill_before_it_runs(hook)  # as the OOM killer would, while it restores a large state
        started = time.monotonic()
        hook.step()  # another restart, and step() does not wait for it
        assert time.monotonic() - started < 0.5
        assert hook.counts.sidecar_restarts == restarts and hook.counts.taken == taken
    kill_before_it_runs(hook)
    with pytest.raises(SidecarError, match=r"killed before it started \(exit code -9\), 3 restarts in a row"):
        hook.step()
    assert hook.counts.sidecar_restarts == 3
    hook.close()


def test_close_after_the_sidecar_died_returns_and_keeps_the_saved_averages(tmp_path: Path) -> None:
    hook = trained_hook(tmp_path, strict=True, save_every=1)
    within(BOUND, lambda: hook.averaged_state_dict("ema_0.9"))
    kill(hook)
    counts = within(BOUND, hook.close)  # every snapshot is saved: nothing to restart a sidecar for
    assert counts.taken == 3 and counts.sidecar_restarts == 0
    assert (tmp_path / "avg" / "ema_0.9" / "latest").resolve().name == "step_3"


def read_latest(out_dir: Path, label: str) -> dict[str, torch.Tensor]:
    with open_checkpoint(out_dir / label / "latest") as checkpoint:
        return {name: checkpoint.read(name) for name in checkpoint.names()}


def test_close_after_the_sidecar_died_unsaved_keeps_the_model_and_says_what_was_lost(tmp_path: Path) -> None:
    hook = trained_hook(tmp_path, strict=True)  # save_every=None: the dead sidecar had saved nothing
    within(BOUND, lambda: hook.averaged_state_dict("ema_0.9"))
    kill(hook)
    with pytest.warns(UserWarning, match=r"nothing had been saved .* snapshots up to step 3 are lost"):
        within(BOUND, hook.close)
    saved = read_latest(tmp_path / "avg", "ema_0.9")  # before: nothing was written at all
    assert torch.equal(saved["weight"], hook.model.weight.detach())  # the model as it is at the end


def test_close_after_the_sidecar_died_folds_the_model_into_its_last_save(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    hook = WeightAveraging(model, [EMA(0.5)], out_dir=tmp_path / "avg", strict=True, save_every=2)
    expected = EMA(0.5)
    for step in range(1, 6):
        with torch.no_grad():
            model.weight.add_(1.0)
        hook.step()
        expected.update({n: t.detach().clone() for n, t in model.state_dict().items()}, step)
    within(BOUND, lambda: hook.averaged_state_dict("ema_0.5"))  # step 5 is folded; step 4 was the last save
    kill(hook)
    with pytest.warns(UserWarning, match=r"snapshots after step 4, its last save, up to step 5 are lost"):
        within(BOUND, hook.close)
    saved = read_latest(tmp_path / "avg", "ema_0.5")
    # The model has not moved since step 5: folded into the save of step 4 it gives the lost average exactly.
    assert (tmp_path / "avg" / "ema_0.5" / "latest").resolve().name == "step_5"
    assert all(torch.equal(saved[n], t) for n, t in expected.result().items())


def test_a_failed_final_save_raises_its_cause_at_once_and_frees_out_dir(tmp_path: Path) -> None:
    hook = trained_hook(tmp_path, strict=True)
    within(BOUND, lambda: hook.averaged_state_dict("ema_0.9"))
    (tmp_path / "avg" / "ema_0.9" / "latest" / "x").mkdir(parents=True)  # as `cp -rL` leaves it
    started = time.monotonic()
    with pytest.raises(AveragesNotSavedError, match=r"IsADirectoryError.*nothing of this run's averages is saved"):
        within(BOUND, hook.close)
    assert time.monotonic() - started < BOUND / 2
    WeightAveraging(torch.nn.Linear(3, 2), [EMA(0.9)], out_dir=tmp_path / "avg").close()  # the lock is free


def test_misuse_of_the_hook_names_the_call_to_make(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    no_sfa = WeightAveraging(model, [EMA(0.9)], out_dir=tmp_path / "avg")
    with pytest.raises(HookUsageError, match=r"start_task\(\) needs SFA"):
        no_sfa.start_task()
    with pytest.raises(HookUsageError, match=r"merge_back\(\) needs SFA"):
        no_sfa.merge_back()
    no_sfa.close()
    with pytest.raises(HookUsageError, match=r"after close\(\)"):
        no_sfa.averaged_state_dict("ema_0.9")
    sfa = WeightAveraging(model, [SFA(beta=0.5)])
    with pytest.raises(HookUsageError, match=r"call start_task\(\) first"):
        sfa.end_task()
    with pytest.raises(UnknownAverageError, match="keeps: none"):
        sfa.averaged_state_dict("ema_0.9")
    sfa.close()
    with pytest.raises(ValueError, match="beta must be in"):
        SFA(beta=1.5)
    with pytest.raises(TypeError, match="neither an average"):
        WeightAveraging(model, [EMA])  # the class, not an instance
