"""The training hook and its sidecar process, on CPU models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mergekit_like.averaging import EMA as OfflineEMA
from mergekit_like.errors import HookUsageError
from mergekit_like.hook import EMA, LAWA, SFA, SWA, WeightAveraging
from mergekit_like.io import open_checkpoint


def tiny_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2)).to(dtype)


def train_steps(model: torch.nn.Module, steps: int, hook: WeightAveraging | None = None,
                seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """A deterministic 'training': random updates; returns the weights after every step."""
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
            model.train()
            model(torch.randn(4, 6, generator=g).to(next(model.parameters()).dtype))
        history.append({n: t.detach().clone() for n, t in model.state_dict().items()})
        if hook is not None:
            hook.step()
    return history


def read(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {n: ckpt.read(n) for n in ckpt.names()}


def test_hook_averages_equal_the_offline_classes_and_averaged_model(tmp_path: Path) -> None:
    model = tiny_model()
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    hook = WeightAveraging(model, [EMA(0.9, per_checkpoint=True), SWA(), LAWA(k=3, nu=2)], snapshot_every=1,
                           out_dir=tmp_path / "avg", save_every=4, strict=True)
    history = []
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            model(torch.randn(4, 6, generator=g))
        history.append({n: t.detach().clone() for n, t in model.state_dict().items()})
        reference.update_parameters(model)
        hook.step()
    live_ema = hook.averaged_state_dict("ema_0.9")
    counts = hook.close()
    assert counts.taken == 10 and counts.skipped == 0
    for name, value in reference.module.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(live_ema[name], value), name
    offline = OfflineEMA(0.9, per_checkpoint=True)
    for step, snapshot in enumerate(history, 1):
        offline.update(snapshot, step)
    final = read(tmp_path / "avg" / "ema_0.9" / "latest")
    for name, value in offline.result().items():
        assert torch.equal(final[name], value.to(final[name].dtype)), name
    assert final["1.num_batches_tracked"].item() == 10  # integer buffers: the newest
    swa = read(tmp_path / "avg" / "swa" / "latest")
    mean = torch.stack([h["0.weight"] for h in history]).mean(0)
    torch.testing.assert_close(swa["0.weight"], mean)
    lawa = read(tmp_path / "avg" / "lawa_k3_nu2" / "latest")  # newest first, 2 steps apart: 10, 8, 6
    torch.testing.assert_close(lawa["0.weight"], (history[5]["0.weight"] + history[7]["0.weight"]
                                                 + history[9]["0.weight"]) / 3)
    saved = sorted(p.name for p in (tmp_path / "avg" / "ema_0.9").iterdir())
    assert saved == ["latest", "state", "step_10", "step_8"]  # keep_last=2, plus the state


def test_bf16_model_gets_a_float32_ema_that_moves(tmp_path: Path) -> None:
    model = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    hook = WeightAveraging(model, [EMA(0.99, per_checkpoint=True)], out_dir=tmp_path / "avg", strict=True)
    hook.step()
    with torch.no_grad():
        model.weight.fill_(1.5)
    for _ in range(100):
        hook.step()
    ema = hook.averaged_state_dict("ema_0.99")["weight"]
    hook.close()
    assert ema.dtype == torch.float32
    assert ema.item() == pytest.approx(1.5 - 0.5 * 0.99 ** 100, abs=1e-5)  # a bf16 EMA stays at 1.0


def test_back_pressure_skips_and_counts_instead_of_waiting(tmp_path: Path) -> None:
    model = torch.nn.Linear(512, 512)
    hook = WeightAveraging(model, [EMA(0.9)], out_dir=tmp_path / "avg", snapshot_every=1)
    assert hook.wait_until_ready()
    for _ in range(200):
        hook.step()  # far faster than the sidecar can fold in 1 MB snapshots
    counts = hook.close()
    assert counts.taken + counts.skipped == 200 and counts.skipped > 0 and counts.taken >= 1


def test_sfa_merge_back_is_exact_and_periodic() -> None:
    model = tiny_model(torch.bfloat16)
    hook = WeightAveraging(model, [SFA(beta=0.25, p=0.5, steps_per_task=4)])
    hook.start_task()
    anchor = {n: t.clone() for n, t in model.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    for step in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
        before = {n: t.clone() for n, t in model.state_dict().items()}
        hook.step()
        for name, value in model.state_dict().items():
            if not value.is_floating_point():
                continue
            expected = torch.lerp(before[name], anchor[name], 0.25) if step % 2 == 0 else before[name]
            assert torch.equal(value, expected), (step, name)
    hook.close()


def test_killed_sidecar_is_restarted_and_resumes_from_its_saved_state(tmp_path: Path) -> None:
    model = tiny_model()
    hook = WeightAveraging(model, [EMA(0.5, per_checkpoint=True)], out_dir=tmp_path / "avg", save_every=1,
                           strict=True)
    history = train_steps(model, 3, hook)
    hook.averaged_state_dict("ema_0.5")  # the three snapshots are folded in and saved
    os.kill(hook._sidecar.process.pid, signal.SIGKILL)
    hook._sidecar.process.join()
    with pytest.warns(UserWarning, match="sidecar died"):
        history += train_steps(model, 2, hook, seed=2)
    counts = hook.close()
    assert counts.sidecar_restarts == 1
    expected = OfflineEMA(0.5, per_checkpoint=True)
    for step, snapshot in enumerate(history, 1):
        expected.update(snapshot, step)
    final = read(tmp_path / "avg" / "ema_0.5" / "latest")
    torch.testing.assert_close(final["0.weight"], expected.result()["0.weight"])


TRAINER = """
import sys, time, torch
from mergekit_like.hook import WeightAveraging, EMA
model = torch.nn.Linear(4, 4)
hook = WeightAveraging(model, [EMA(0.9)], out_dir=sys.argv[1], strict=True)
for _ in range(5):
    with torch.no_grad():
        model.weight.add_(1.0)
    hook.step()
hook.averaged_state_dict("ema_0.9")
print("ready", flush=True)
time.sleep(600)
"""


def test_killed_trainer_makes_the_sidecar_save_and_exit(tmp_path: Path) -> None:
    out = tmp_path / "avg"
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, str(out)], stdout=subprocess.PIPE, text=True)
    assert trainer.stdout is not None and trainer.stdout.readline().strip() == "ready"
    trainer.kill()
    trainer.wait()
    deadline = time.time() + 60

    def settled() -> bool:  # the sidecar has written the average and its state, and exited
        return (out / "ema_0.9" / "latest").exists() and (out / "ema_0.9" / "state" / "state.json").exists() \
            and not list(out.rglob(".*tmp-*"))

    while not settled() and time.time() < deadline:
        time.sleep(0.2)
    final = read(out / "ema_0.9" / "latest")
    assert final["weight"].shape == (4, 4)
    assert not [p for p in out.rglob(".*tmp-*")]  # no partial directories


def test_a_resumed_run_continues_the_saved_averages(tmp_path: Path) -> None:
    model = tiny_model()
    first = WeightAveraging(model, [EMA(0.5, per_checkpoint=True), LAWA(k=2)], out_dir=tmp_path / "avg",
                            strict=True)
    history = train_steps(model, 3, first)
    first.close()
    resumed = WeightAveraging(model, [EMA(0.5, per_checkpoint=True), LAWA(k=2)], out_dir=tmp_path / "avg",
                              strict=True, start_step=3)
    history += train_steps(model, 2, resumed, seed=7)
    resumed.close()
    expected = OfflineEMA(0.5, per_checkpoint=True)
    for step, snapshot in enumerate(history, 1):
        expected.update(snapshot, step)
    final = read(tmp_path / "avg" / "ema_0.5" / "latest")
    torch.testing.assert_close(final["0.weight"], expected.result()["0.weight"])
    lawa = read(tmp_path / "avg" / "lawa_k2_nu0" / "latest")
    torch.testing.assert_close(lawa["0.weight"], (history[3]["0.weight"] + history[4]["0.weight"]) / 2)


def test_sfa_end_of_task_merges_once_when_the_last_step_already_merged() -> None:
    model = tiny_model()
    hook = WeightAveraging(model, [SFA(beta=0.5, p=0.5, steps_per_task=4)])
    hook.start_task()
    anchor = {n: t.clone() for n, t in model.state_dict().items()}
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        hook.step()  # merges at task steps 2 and 4
    merged = {n: t.clone() for n, t in model.state_dict().items()}
    hook.end_task()  # step 4 merged already: nothing more
    assert all(torch.equal(model.state_dict()[n], merged[n]) for n in merged)
    weight = "0.weight" if "0.weight" in anchor else next(iter(anchor))
    # the same four steps by hand: +1 each step, a merge toward the anchor after steps 2 and 4
    expected = anchor[weight].clone()
    for step in range(1, 5):
        expected += 1.0
        if step % 2 == 0:
            expected = torch.lerp(expected, anchor[weight], 0.5)
    assert torch.equal(model.state_dict()[weight], expected)
    for _ in range(4):  # between tasks: no merge-back toward the old task's anchor
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        hook.step()
    assert torch.equal(model.state_dict()[weight], expected + 4.0)
    with pytest.raises(HookUsageError, match=r"call start_task\(\) first"):
        hook.end_task()
    hook.close()


def test_out_dtype_float32_keeps_what_rounding_to_the_models_bf16_would_undo(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    start = {n: t.clone() for n, t in model.state_dict().items()}
    runs = {}
    for name, out_dtype in (("own", None), ("f32", torch.float32)):
        with torch.no_grad():
            for n, t in model.state_dict().items():
                t.copy_(start[n])
        hook = WeightAveraging(model, [EMA(0.999)], out_dir=tmp_path / name, strict=True, out_dtype=out_dtype)
        for step in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.05)  # bf16 steps an EMA of decay 0.999 moves by far less than a bf16 ulp
            hook.step()
            if step == 0:
                first = {n: t.clone() for n, t in model.state_dict().items()}  # where the EMA starts
        state = hook.averaged_state_dict("ema_0.999")
        hook.close()
        runs[name] = (read(tmp_path / name / "ema_0.999" / "latest"), state)
    weight = "model.layers.0.mlp.up_proj.weight"
    own, state = runs["own"]
    assert own[weight].dtype == torch.bfloat16 and torch.equal(own[weight], first[weight])  # the move is lost
    f32, state = runs["f32"]
    assert f32[weight].dtype == torch.float32 and torch.equal(f32[weight], state[weight])
    assert not torch.equal(f32[weight], first[weight].float())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "f32" / "ema_0.999" / "latest",
                                                               dtype="auto")
    assert loaded.dtype == torch.float32  # config.json says float32 too
    with pytest.raises(HookUsageError, match="out_dtype must be a floating dtype"):
        WeightAveraging(model, [EMA(0.9)], out_dir=tmp_path / "int", out_dtype=torch.int8)
