"""The hook's faults outside the sidecar's own: resumed framework runs, a broken or shared out_dir, a script on stdin.

Every call that waits on a sidecar runs with a bound, so a regression fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from mergekit_like.errors import HookUsageError, OutputLockedError
from mergekit_like.hook import EMA, SWA, WeightAveraging
from mergekit_like.io import open_checkpoint

BOUND = 30.0  # seconds any wait here may take (a sidecar starts in a few)
CHILD_TIMEOUT = 180  # seconds a child Python (torch import, sidecar, averaging) may take on a loaded machine


def read(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as checkpoint:
        return {name: checkpoint.read(name) for name in checkpoint.names()}


def saved_state(out_dir: Path, label: str) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((out_dir / label / "state" / "state.json").read_text())
    return state


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {BOUND} s")
        time.sleep(0.1)


# -- resumed runs of the adapters -------------------------------------------------------------------

def tiny_llama(transformers: Any) -> Any:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def hf_train(transformers: Any, tmp_path: Path, max_steps: int, resume: str | None = None) -> Any:
    from mergekit_like.hook.adapters import hf_trainer_callback

    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=max_steps,
                                          per_device_train_batch_size=2, report_to=[], save_strategy="steps",
                                          save_steps=6, use_cpu=True, disable_tqdm=True)
    callback = hf_trainer_callback([SWA()], out_dir=tmp_path / "avg", strict=True)
    trainer = transformers.Trainer(model=tiny_llama(transformers), args=args, train_dataset=data,
                                   callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return callback


def test_a_resumed_hf_trainer_run_continues_the_averages_and_their_steps(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf_train(transformers, tmp_path, 6)
    assert saved_state(tmp_path / "avg", "swa")["count"] == 6
    resumed = hf_train(transformers, tmp_path, 10, resume=str(tmp_path / "trainer" / "checkpoint-6"))
    assert resumed.averaging.step_count == 10 and resumed.averaging.counts.taken == 4
    state = saved_state(tmp_path / "avg", "swa")
    assert state["last_step"] == 10 and state["count"] == 10  # six snapshots before, four after
    assert (tmp_path / "avg" / "swa" / "latest").resolve().name == "step_10"


def lightning_module() -> Any:
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")

    class Tiny(pl.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, _index: int) -> torch.Tensor:
            return self.layer(batch[0]).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return pl, Tiny


def lightning_fit(tmp_path: Path, max_steps: int, ckpt_path: Path | None = None, **options: Any) -> tuple[Any, Any]:
    from mergekit_like.hook.adapters import lightning_callback

    pl, Tiny = lightning_module()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=4)
    callback = lightning_callback([SWA()], out_dir=tmp_path / "avg", strict=True)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], **options)
    trainer.fit(Tiny(), data, ckpt_path=ckpt_path)
    return trainer, callback


def test_a_resumed_lightning_run_continues_the_averages_and_their_steps(tmp_path: Path) -> None:
    first, _ = lightning_fit(tmp_path, 6)
    first.save_checkpoint(tmp_path / "six.ckpt")
    assert saved_state(tmp_path / "avg", "swa")["count"] == 6
    trainer, resumed = lightning_fit(tmp_path, 10, ckpt_path=tmp_path / "six.ckpt")
    assert trainer.global_step == 10
    assert resumed.averaging.step_count == 10 and resumed.averaging.counts.taken == 4
    state = saved_state(tmp_path / "avg", "swa")
    assert state["last_step"] == 10 and state["count"] == 10
    assert (tmp_path / "avg" / "swa" / "latest").resolve().name == "step_10"


def test_lightning_steps_the_hook_once_per_optimizer_step_when_gradients_accumulate(tmp_path: Path) -> None:
    trainer, callback = lightning_fit(tmp_path, 3, accumulate_grad_batches=2)
    assert trainer.global_step == 3
    assert callback.averaging.step_count == 3 and callback.averaging.counts.taken == 3


def test_a_resumed_hook_without_its_start_step_warns_once_that_snapshots_are_ignored(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    first = WeightAveraging(model, [SWA()], out_dir=tmp_path / "avg", strict=True)
    for _ in range(3):
        first.step()
    first.close()
    resumed = WeightAveraging(model, [SWA()], out_dir=tmp_path / "avg", strict=True)  # no start_step=3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            resumed.step()
        resumed.averaged_state_dict("swa", timeout=BOUND)
    resumed.close()
    said = [str(w.message) for w in caught if "not averaged" in str(w.message)]
    assert len(said) == 1 and "at step 3" in said[0] and "start_step=global_step" in said[0], said


# -- out_dir: checked at construction, saves that fail later, one hook at a time ----------------------

def test_an_out_dir_below_a_regular_file_is_refused_at_construction_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a directory")
    with pytest.raises(HookUsageError, match=r"out_dir .*afile/sub cannot hold the averages") as caught:
        WeightAveraging(torch.nn.Linear(3, 2), [EMA(0.9)], out_dir=tmp_path / "afile" / "sub")
    assert "\n" not in str(caught.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_an_out_dir_that_cannot_be_written_is_refused_at_construction(tmp_path: Path) -> None:
    locked = tmp_path / "read_only"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for out_dir in (locked, locked / "avg"):
            with pytest.raises(HookUsageError, match="cannot hold the averages"):
                WeightAveraging(torch.nn.Linear(3, 2), [EMA(0.9)], out_dir=out_dir)
    finally:
        locked.chmod(0o700)


def test_a_hook_without_a_sidecar_leaves_out_dir_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mergekit_like.hook import SFA

    monkeypatch.chdir(tmp_path)
    WeightAveraging(torch.nn.Linear(3, 2), [SFA()]).close()  # SFA alone keeps no averages
    assert not (tmp_path / "averages").exists()


def test_a_save_that_fails_warns_once_while_averaging_goes_on_and_is_retried(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "avg"
    out.mkdir()
    model = torch.nn.Linear(3, 2)
    first = model.weight.detach().clone()
    hook = WeightAveraging(model, [SWA()], out_dir=out, save_every=1, strict=True)
    assert hook.wait_until_ready(timeout=BOUND)
    pid = hook._sidecar.process.pid
    (out / "swa").write_text("in the way")  # every save of the average now fails, as on a full disk
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            with torch.no_grad():
                model.weight.add_(1.0)
            hook.step()
        average = hook.averaged_state_dict("swa", timeout=BOUND)
        hook.step()
    torch.testing.assert_close(average["weight"], first + 3.5)  # the six snapshots were all averaged
    said = [str(w.message) for w in caught if "could not be saved" in str(w.message)]
    assert len(said) == 1, said
    assert str(out / "swa") in said[0] and "tried again" in said[0]
    assert "not a directory" in said[0].lower() or "file exists" in said[0].lower()  # the OS error, in words
    assert hook.counts.sidecar_restarts == 0 and hook._sidecar.process.pid == pid
    (out / "swa").unlink()  # space is free again: a retry saves without another snapshot
    wait_for(lambda: (out / "swa" / "latest").exists(), "the retried save")
    torch.testing.assert_close(read(out / "swa" / "latest")["weight"], first + 27 / 7)  # and the seventh
    hook.close()
    log = capfd.readouterr().err
    assert "was not averaged" not in log and "Traceback" not in log, log


def test_save_retries_back_off_by_doubling_to_a_ceiling() -> None:
    from mergekit_like.hook.sidecar import SAVE_RETRY_FIRST, SAVE_RETRY_MOST, SaveRetries

    retries = SaveRetries()
    assert retries.due(0.0)
    delays = [retries.failed(now=100.0) for _ in range(12)]
    assert delays[:3] == [SAVE_RETRY_FIRST, 2 * SAVE_RETRY_FIRST, 4 * SAVE_RETRY_FIRST]
    assert max(delays) == SAVE_RETRY_MOST and delays[-1] == SAVE_RETRY_MOST
    assert not retries.due(100.0 + SAVE_RETRY_MOST - 1) and retries.due(100.0 + SAVE_RETRY_MOST)
    assert retries.succeeded() == 12
    assert retries.due(0.0) and retries.failed(now=0.0) == SAVE_RETRY_FIRST


def test_a_second_hook_on_the_same_out_dir_is_refused_while_the_first_lives(tmp_path: Path) -> None:
    first = WeightAveraging(torch.nn.Linear(3, 2), [EMA(0.9)], out_dir=tmp_path / "avg")
    with pytest.raises(OutputLockedError, match=rf"another WeightAveraging \(process {os.getpid()}\)") as caught:
        WeightAveraging(torch.nn.Linear(3, 2), [EMA(0.9)], out_dir=tmp_path / "avg")
    assert "\n" not in str(caught.value)
    first.close()
    WeightAveraging(torch.nn.Linear(3, 2), [EMA(0.9)], out_dir=tmp_path / "avg").close()  # free once closed


SECOND_HOOK = """
import sys, torch
from mergekit_like.hook import WeightAveraging, EMA
try:
    WeightAveraging(torch.nn.Linear(3, 2), [EMA(0.9)], out_dir=sys.argv[1]).close()
    print("accepted")
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_a_hook_of_another_process_on_the_same_out_dir_is_refused(tmp_path: Path) -> None:
    first = WeightAveraging(torch.nn.Linear(3, 2), [EMA(0.9)], out_dir=tmp_path / "avg")
    second = subprocess.run([sys.executable, "-c", SECOND_HOOK, str(tmp_path / "avg")], capture_output=True,
                            text=True, timeout=CHILD_TIMEOUT)
    first.close()
    assert second.stdout.startswith("OutputLockedError"), second.stdout + second.stderr
    assert f"(process {os.getpid()})" in second.stdout


TRAINER = """
import sys, time, torch
from mergekit_like.hook import WeightAveraging, EMA
hook = WeightAveraging(torch.nn.Linear(3, 2), [EMA(0.9)], out_dir=sys.argv[1], strict=True)
hook.step()
hook.averaged_state_dict("ema_0.9")
print("ready", flush=True)
time.sleep(600)
"""


def test_the_lock_of_a_killed_trainer_is_taken_over_once_its_sidecar_has_saved(tmp_path: Path) -> None:
    out = tmp_path / "avg"
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout is not None and trainer.stdout.readline().strip() == "ready"
    finally:
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait()
    assert (out / ".hook.lock").exists()
    hooks: list[WeightAveraging] = []

    def taken_over() -> bool:
        try:
            hooks.append(WeightAveraging(torch.nn.Linear(3, 2), [EMA(0.9)], out_dir=out))
        except OutputLockedError:  # the orphaned sidecar still saves; it exits within seconds
            return False
        return True

    wait_for(taken_over, "taking over the lock of the killed trainer")
    hooks[0].close()
    assert (out / "ema_0.9" / "latest").exists()  # the orphaned sidecar saved before it let go


# -- a training script on standard input --------------------------------------------------------------

STDIN_SCRIPT = """
import sys, torch
from mergekit_like.hook import WeightAveraging, EMA
model = torch.nn.Linear(3, 2)
hook = WeightAveraging(model, [EMA(0.5)], out_dir=sys.argv[1], strict=True)
assert hook.wait_until_ready(timeout=60)
for _ in range(3):
    with torch.no_grad():
        model.weight.add_(1.0)
    hook.step()
hook.averaged_state_dict("ema_0.5")
print("taken", hook.close().taken)
"""


def test_a_training_script_read_from_stdin_gets_a_sidecar(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-", str(tmp_path / "avg")], input=STDIN_SCRIPT, capture_output=True,
                         text=True, timeout=CHILD_TIMEOUT)
    assert run.returncode == 0 and "taken 3" in run.stdout, run.stdout + run.stderr
    assert (tmp_path / "avg" / "ema_0.5" / "latest").exists()


STDIN_AVERAGER = """
import sys, torch
from mergekit_like.hook import WeightAveraging, EMA
class MyEMA(EMA):
    pass
try:
    WeightAveraging(torch.nn.Linear(3, 2), [MyEMA(0.5)], out_dir=sys.argv[1]).close()
    print("accepted")
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_an_average_defined_in_a_script_on_stdin_is_refused_at_construction(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-", str(tmp_path / "avg")], input=STDIN_AVERAGER, capture_output=True,
                         text=True, timeout=CHILD_TIMEOUT)
    assert run.stdout.startswith("HookUsageError") and "MyEMA" in run.stdout, run.stdout + run.stderr
    assert len(run.stdout.strip().splitlines()) == 1


def test_keep_last_below_one_and_a_step_after_close_are_refused(tmp_path: Path) -> None:
    with pytest.raises(HookUsageError, match="keep_last must be at least 1"):
        WeightAveraging(torch.nn.Linear(2, 2), [EMA(decay=0.9)], out_dir=tmp_path / "a", keep_last=0)
    hook = WeightAveraging(torch.nn.Linear(2, 2), [EMA(decay=0.9)], out_dir=tmp_path / "b")
    hook.step()
    hook.close()
    with pytest.raises(HookUsageError, match=r"step\(\) after close\(\)"):
        hook.step()


def test_a_short_run_takes_its_first_snapshot_without_wait_until_ready(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    hook = WeightAveraging(model, [SWA()], out_dir=tmp_path / "avg", snapshot_every=1)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        hook.step()
    counts = hook.close()
    assert counts.taken >= 1 and counts.taken + counts.skipped == 3
