"""Averaging rules (EMA, SWA, LAWA, SFA): closed forms, torch's swa_utils, trajectories."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import write_checkpoint
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mergekit_like.averaging import (
    EMA,
    LAWA,
    SWA,
    UniformMean,
    decay_from_half_life,
    lawa_selection,
    offline,
    sfa_merge,
)
from mergekit_like.averaging.offline import (
    ema_outputs,
    lawa_outputs,
    memory_bound,
    peak_states,
    run_average,
    sfa_outputs,
    swa_outputs,
)
from mergekit_like.averaging.sfa import AnchorPull
from mergekit_like.averaging.trajectory import discover, from_paths, root_weights, step_of
from mergekit_like.errors import CheckpointNotFoundError, IncompatibleModelsError, InvalidCheckpointError, RecipeError
from mergekit_like.io import open_checkpoint


def snap(value: float, steps_seen: int = 0) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([value, 2 * value]), "n": torch.tensor(steps_seen)}


def test_ema_is_step_aware_between_uneven_checkpoints() -> None:
    ema = EMA(0.5)
    ema.update(snap(0.0), 10)
    ema.update(snap(1.0), 11)  # k = 0.5 ** 1
    ema.update(snap(2.0), 13)  # k = 0.5 ** 2
    e1 = 0.5 * 0.0 + 0.5 * 1.0
    e2 = 0.25 * e1 + 0.75 * 2.0
    torch.testing.assert_close(ema.result()["w"], torch.tensor([e2, 2 * e2]))


def test_ema_per_checkpoint_and_half_life() -> None:
    ema = EMA(half_life=2, per_checkpoint=True)
    assert ema.decay == pytest.approx(2 ** -0.5)
    ema.update(snap(0.0), 1)
    ema.update(snap(1.0), 100)  # per checkpoint: k = decay, whatever the gap
    torch.testing.assert_close(ema.result()["w"][0], torch.tensor(1 - 2 ** -0.5))
    assert decay_from_half_life(1) == 0.5


def test_ema_stays_in_float32_for_bf16_snapshots() -> None:
    ema = EMA(0.999, per_checkpoint=True)
    ema.update({"w": torch.ones(1, dtype=torch.bfloat16)}, 0)
    for step in range(1, 1001):
        ema.update({"w": torch.full((1,), 1.5, dtype=torch.bfloat16)}, step)
    # methods.md: bf16 would stay at 1.0; float32 gives 1.316
    assert ema.result()["w"].dtype == torch.float32
    assert ema.result()["w"].item() == pytest.approx(1.5 - 0.5 * 0.999 ** 1000, abs=1e-4)


def test_integer_tensors_come_from_the_newest_snapshot() -> None:
    for averager in (EMA(0.9), SWA(), UniformMean(), LAWA(k=2), AnchorPull(0.5)):
        averager.update(snap(1.0, 5), 1)
        averager.update(snap(3.0, 7), 2)
        assert averager.result()["n"].item() == 7, type(averager).__name__
        assert averager.result()["n"].dtype == torch.int64, type(averager).__name__


def test_swa_window_and_running_mean() -> None:
    swa = SWA(start=2, end=4)
    used = [swa.update(snap(float(v)), step) for step, v in enumerate([100, 100, 1, 2, 6, 100])]
    assert used == [False, False, True, True, True, False]
    torch.testing.assert_close(swa.result()["w"], torch.tensor([3.0, 6.0]))


@pytest.mark.parametrize("group_bytes", [None, 16], ids=["one fold call", "a fold call per tensor"])
def test_online_classes_equal_torch_swa_utils_bit_for_bit(group_bytes: int | None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if group_bytes is not None:  # the grouping that bounds a fold's scratch changes no bit
        monkeypatch.setattr("mergekit_like.averaging.base.FOLD_GROUP_BYTES", group_bytes)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    references = {"ema": AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True),
                  "swa": AveragedModel(model, use_buffers=True)}
    ours = {"ema": EMA(0.9, per_checkpoint=True), "swa": UniformMean()}
    for step in range(1, 9):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model(torch.randn(8, 5))  # moves the BatchNorm buffers
        for name in references:
            references[name].update_parameters(model)
            ours[name].update(model.state_dict(), step)
    for name, reference in references.items():
        result = ours[name].result()
        for key, value in reference.module.state_dict().items():
            if value.is_floating_point():
                assert torch.equal(result[key], value), (name, key)


def test_steps_must_increase() -> None:
    ema = EMA(0.9)
    ema.update(snap(1.0), 5)
    with pytest.raises(ValueError, match="does not follow step 5"):
        ema.update(snap(1.0), 5)


def test_lawa_selection_newest_backwards_with_spacing() -> None:
    steps = [100, 200, 250, 300, 400, 450, 500]
    assert lawa_selection(steps, k=3, nu=100) == [3, 4, 6]  # 500, 400, 300 (450 is too close to 500)
    assert lawa_selection(steps, k=3, nu=150) == [0, 3, 6]  # 500, then 300, then 100
    assert lawa_selection(steps, k=10, nu=0) == list(range(7))
    assert lawa_selection(steps[:2], k=5, nu=50) == [0, 1]  # fewer than k available


def test_online_lawa_keeps_the_latest_k_spaced_snapshots() -> None:
    lawa = LAWA(k=2, nu=10)
    for step, value in [(0, 0.0), (5, 50.0), (10, 1.0), (20, 3.0)]:
        lawa.update(snap(value), step)
    # Newest first: 20, then the newest at least 10 before it, 10; with k = 2 chosen, 0 and 5 can go.
    assert lawa.chosen_steps == lawa.steps == [10, 20]
    torch.testing.assert_close(lawa.result()["w"], torch.tensor([2.0, 4.0]))


def test_sfa_merge_and_anchor_pull_agree() -> None:
    model, anchor = snap(4.0, 9), snap(0.0, 1)
    merged = sfa_merge(model, anchor, beta=0.25)
    torch.testing.assert_close(merged["w"], torch.tensor([3.0, 6.0]))
    assert merged["n"].item() == 9
    pull = AnchorPull(0.25)
    pull.update(anchor, 0)
    pull.update(model, 1)
    assert torch.equal(pull.result()["w"], merged["w"])


# -- trajectories ------------------------------------------------------------------


def make_run(tmp_path: Path, steps: list[int], pattern: str = "checkpoint-{}", dtype=torch.float32) -> Path:
    run = tmp_path / "run"
    for i, step in enumerate(steps):
        write_checkpoint(run / pattern.format(step), {"w": torch.full((3, 2), float(i)).to(dtype),
                                                      "count": torch.tensor(step)}, config={"model_type": "x"})
    (run / "runs").mkdir(exist_ok=True)  # tensorboard logs and the like are ignored
    return run


@pytest.mark.parametrize("pattern", ["checkpoint-{}", "step_{}", "step-{}", "iter_{:07d}"])
def test_discover_orders_by_step(tmp_path: Path, pattern: str) -> None:
    run = make_run(tmp_path, [1000, 200, 30], pattern)
    assert [p.step for p in discover(run)] == [30, 200, 1000]


def test_discover_safetensors_files_and_trainer_state(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (5, 10):
        write_checkpoint(tmp_path / "tmp", {"w": torch.ones(1)})
        (tmp_path / "tmp" / "model.safetensors").rename(run.mkdir(exist_ok=True) or run / f"ema_{step}.safetensors")
    assert [p.step for p in discover(run)] == [5, 10]
    other = tmp_path / "other"
    write_checkpoint(other / "final", {"w": torch.ones(1)})
    (other / "final" / "trainer_state.json").write_text(json.dumps({"global_step": 77}))
    assert [p.step for p in discover(other)] == [77]


def test_duplicate_and_conflicting_steps_are_errors(tmp_path: Path) -> None:
    run = make_run(tmp_path, [100], "checkpoint-{}")
    write_checkpoint(run / "step_100", {"w": torch.ones(1)})
    with pytest.raises(InvalidCheckpointError, match="both at step 100"):
        discover(run)
    (run / "checkpoint-100" / "trainer_state.json").write_text(json.dumps({"global_step": 99}))
    with pytest.raises(InvalidCheckpointError, match=r"name says step 100 but trainer_state\.json says 99"):
        discover(run)


def test_unparseable_and_empty_runs(tmp_path: Path) -> None:
    run = make_run(tmp_path, [1, 2])
    write_checkpoint(run / "best", {"w": torch.ones(1)})
    with pytest.raises(InvalidCheckpointError, match="no step number in the name of best"):
        discover(run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="holds no checkpoints"):
        discover(tmp_path / "empty")


def test_only_unparseable_entries_name_them(tmp_path: Path) -> None:
    for name in ("best", "final"):
        write_checkpoint(tmp_path / "run" / name, {"w": torch.ones(1)})
    with pytest.raises(InvalidCheckpointError, match="no step number in the name of best, final"):
        discover(tmp_path / "run")


def test_root_weights_beside_step_named_checkpoints_are_not_points(tmp_path: Path) -> None:
    run = make_run(tmp_path, [10, 20])
    write_checkpoint(run, {"w": torch.ones(3, 2)})  # a Trainer's final model.safetensors at the root
    (run / "training_args.bin").write_bytes(b"not weights")
    assert [p.path.name for p in discover(run)] == ["checkpoint-10", "checkpoint-20"]
    assert [p.name for p in root_weights(run)] == ["model.safetensors"]


def test_deeply_nested_trainer_state_is_the_tools_error(tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / "final", {"w": torch.ones(1)})
    (checkpoint / "trainer_state.json").write_text("[" * 100_000)
    with pytest.raises(InvalidCheckpointError, match=r"trainer_state\.json: is not a JSON object"):
        step_of(checkpoint)


def test_explicit_list_keeps_order_and_numbers_positions(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", {"w": torch.ones(1)})
    b = write_checkpoint(tmp_path / "b", {"w": torch.ones(1)})
    assert [(p.step, p.path.name) for p in from_paths([a, b])] == [(1, "a"), (2, "b")]


# -- offline runs --------------------------------------------------------------------


def read(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {n: ckpt.read(n) for n in ckpt.names()}


def test_several_decays_in_one_pass_match_the_online_classes(tmp_path: Path) -> None:
    run = make_run(tmp_path, [10, 20, 40, 80], dtype=torch.bfloat16)
    points = discover(run)
    outputs = ema_outputs(points, decays=[0.9, 0.99])
    written = run_average(points, outputs, tmp_path / "out")
    assert [w.directory.name for w in written] == ["ema_0.9", "ema_0.99"]
    for decay, w in zip([0.9, 0.99], written):
        online = EMA(decay)
        for i, p in enumerate(points):
            online.update({"w": torch.full((3, 2), float(i)).to(torch.bfloat16)}, p.step)
        result = read(w.directory)
        assert result["w"].dtype == torch.bfloat16  # the checkpoints' dtype
        assert torch.equal(result["w"], online.result()["w"].to(torch.bfloat16))
        assert result["count"].item() == 80  # integers from the newest checkpoint
    assert (written[0].directory / "config.json").exists()


def test_lawa_every_step_writes_the_curve(tmp_path: Path) -> None:
    run = make_run(tmp_path, [1, 2, 3, 4, 5])
    points = discover(run)
    outputs = lawa_outputs(points, k=2, nu=0, every_step=True)
    assert peak_states(outputs) == 2
    written = run_average(points, outputs, tmp_path / "out")
    assert [w.directory.name for w in written] == [f"step_{s}" for s in (1, 2, 3, 4, 5)]
    means = [read(w.directory)["w"][0, 0].item() for w in written]
    assert means == [0.0, 0.5, 1.5, 2.5, 3.5]  # checkpoint i holds the value i


def test_swa_window_offline_and_empty_window(tmp_path: Path) -> None:
    points = discover(make_run(tmp_path, [1, 2, 3, 4]))
    written = run_average(points, swa_outputs(points, 2, 3), tmp_path / "out")
    assert read(written[0].directory)["w"][0, 0].item() == 1.5
    with pytest.raises(RecipeError, match="no checkpoint has a step in the SWA window"):
        swa_outputs(points, 10, 20)


def test_checkpoints_with_different_tensors_are_refused(tmp_path: Path) -> None:
    run = make_run(tmp_path, [1, 2])
    write_checkpoint(run / "checkpoint-3", {"v": torch.ones(1)})
    points = discover(run)
    with pytest.raises(IncompatibleModelsError, match=r"checkpoint-1 .*missing"):
        run_average(points, ema_outputs(points, [0.9]), tmp_path / "out")


def input_fds(directory: Path) -> int:
    """How many of this process's file descriptors point into ``directory``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed between listdir and readlink
        count += target.startswith(str(directory))
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors through /proc")
def test_many_checkpoints_never_hold_more_open_files_than_the_cap(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    steps = list(range(1, offline.MAX_OPEN_FILES + 7))
    run = make_run(tmp_path, steps)
    points = discover(run)
    most = 0
    original = offline.Checkpoint.read

    def counting_read(self: offline.Checkpoint, name: str, **kwargs: object) -> torch.Tensor:
        nonlocal most
        tensor = original(self, name, **kwargs)  # type: ignore[arg-type]
        most = max(most, input_fds(run))
        return tensor

    monkeypatch.setattr(offline.Checkpoint, "read", counting_read)
    written = run_average(points, swa_outputs(points, None, None), tmp_path / "out")
    assert most == 1  # over the cap: each checkpoint's file is closed after its read
    mean = sum(range(len(steps))) / len(steps)  # checkpoint i holds the value i
    assert read(written[0].directory)["w"][0, 0].item() == pytest.approx(mean)
    assert input_fds(run) == 0


def test_few_checkpoints_stay_open_across_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[Path] = []
    original = offline.Checkpoint.close

    def recording_close(self: offline.Checkpoint) -> None:
        closed.append(self.path)
        original(self)

    monkeypatch.setattr(offline.Checkpoint, "close", recording_close)
    points = discover(make_run(tmp_path, [1, 2, 3]))
    run_average(points, swa_outputs(points, None, None), tmp_path / "out")
    assert len(closed) == 3  # once each, at the end; not after every tensor (2 tensors x 3 checkpoints)


def test_memory_bound_counts_states_read_tensor_temporaries_and_cast(tmp_path: Path) -> None:
    points = discover(make_run(tmp_path, [1, 2, 3], dtype=torch.bfloat16))
    outputs = ema_outputs(points, decays=[0.9, 0.99])
    with open_checkpoint(points[-1].path) as newest:
        bound = memory_bound(newest, outputs, files=3)
    n = 3 * 2  # the largest tensor, "w", in bf16
    assert bound.bytes == n * (2 * 4 + 2 + 2 * 4 + 2) and bound.states == 2 and bound.tensor == "w"
    assert peak_states(sfa_outputs(0.5)) == 2  # SFA's state holds the anchor as well


def test_check_finite_names_the_tensor_and_the_checkpoint(tmp_path: Path) -> None:
    run = make_run(tmp_path, [1, 2, 3])
    write_checkpoint(run / "checkpoint-2", {"w": torch.tensor([[0.0, float("nan")]] * 3),
                                            "count": torch.tensor(2)})
    points = discover(run)
    outputs = ema_outputs(points, [0.9])
    with pytest.raises(InvalidCheckpointError, match=r"checkpoint-2: tensor 'w': 3 NaN or infinite values") as info:
        run_average(points, outputs, tmp_path / "out", check_finite=True)
    assert "step 2" in str(info.value)
    assert not (tmp_path / "out").exists()
    run_average(points, outputs, tmp_path / "unchecked")  # without the flag the NaN is averaged in
