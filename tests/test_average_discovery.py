"""`mergekit-like average RUN_DIR`: what a run directory holds, --list, and the flags around a run."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import write_checkpoint
from mergekit_like.cli.main import app
from typer.testing import CliRunner

from mergekit_like.io import open_checkpoint
from mergekit_like.io.verify import verify_checkpoint

runner = CliRunner()


def value_of(path: Path) -> float:
    with open_checkpoint(path) as ckpt:
        return ckpt.read("w")[0].item()


def step_files(run: Path, values: dict[int, float]) -> Path:
    """A directory of ``ema_<step>.safetensors`` files, as some trainers save their EMA."""
    run.mkdir(parents=True)
    for step, value in values.items():
        write_checkpoint(run / "tmp", {"w": torch.full((4,), value)})
        (run / "tmp" / "model.safetensors").rename(run / f"ema_{step}.safetensors")
        (run / "tmp").rmdir()
    return run


def trainer_run(tmp_path: Path, values: dict[int, float], final: float) -> Path:
    """A Trainer output directory: checkpoint-N/ folders plus the final model at the root."""
    run = tmp_path / "run"
    for step, value in values.items():
        write_checkpoint(run / f"checkpoint-{step}", {"w": torch.full((4,), value)}, config={"model_type": "x"})
    write_checkpoint(run, {"w": torch.full((4,), final)}, config={"model_type": "x"})
    (run / "training_args.bin").write_bytes(b"pickled arguments, not weights")
    return run


def test_a_directory_of_step_numbered_files_is_a_run(tmp_path: Path) -> None:
    run = step_files(tmp_path / "run", {200: 3.0, 100: 1.0})
    result = runner.invoke(app, ["average", str(run), "--method", "swa", "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert value_of(tmp_path / "out") == 2.0


def test_a_trainer_directory_averages_its_checkpoints_not_its_final_model(tmp_path: Path) -> None:
    run = trainer_run(tmp_path, {10: 1.0, 20: 3.0}, final=100.0)
    result = runner.invoke(app, ["average", str(run), "--method", "swa", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert value_of(tmp_path / "out") == 2.0  # the root's 100 is left out
    assert result.output.count("ignoring the weights at its root (model.safetensors)") == 1


def test_a_directory_without_step_named_entries_is_one_checkpoint(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "model", {"w": torch.full((4,), 5.0)})
    result = runner.invoke(app, ["average", str(model), "--method", "swa", "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert value_of(tmp_path / "out") == 5.0


def test_a_model_directory_with_an_unnumbered_weights_subfolder_is_one_checkpoint(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "model", {"w": torch.full((4,), 5.0)})
    write_checkpoint(model / "export", {"w": torch.full((4,), 9.0)})
    result = runner.invoke(app, ["average", str(model), "--method", "swa", "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert value_of(tmp_path / "out") == 5.0


def test_unparseable_checkpoint_names_are_named(tmp_path: Path) -> None:
    for name in ("best", "final"):
        write_checkpoint(tmp_path / "run" / name, {"w": torch.ones(4)})
    result = runner.invoke(app, ["average", str(tmp_path / "run"), "--method", "swa", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no step number in the name of best, final" in result.output


def test_list_needs_no_method_settings(tmp_path: Path) -> None:
    run = trainer_run(tmp_path, {300: 3.0, 100: 1.0, 200: 2.0}, final=0.0)
    result = runner.invoke(app, ["average", str(run), "--method", "ema", "--list"])
    assert result.exit_code == 0, result.output
    listed = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(words[0]) for words in listed] == [100, 200, 300]
    assert "outputs not shown: ema needs --decay or --half-life" in result.stdout
    as_json = runner.invoke(app, ["average", str(run), "--method", "sfa", "--list", "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert [c["step"] for c in json.loads(as_json.stdout)["checkpoints"]] == [100, 200, 300]


def test_a_real_run_prints_its_memory_bound_first(tmp_path: Path) -> None:
    run = trainer_run(tmp_path, {1: 1.0, 2: 2.0}, final=0.0)
    result = runner.invoke(app, ["average", str(run), "--method", "ema", "--decay", "0.5,0.9",
                                 "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    # 4 float32 elements x (2 states + the read tensor + 2 temporaries + the cast written)
    assert "memory bound: 96 B (2 float32 state(s)" in result.output
    assert result.output.index("memory bound") < result.output.index("wrote ")


def test_sfa_with_several_models_is_an_error(tmp_path: Path) -> None:
    run = trainer_run(tmp_path, {1: 1.0, 2: 2.0, 3: 3.0}, final=0.0)
    result = runner.invoke(app, ["average", str(run / "checkpoint-2"), str(run / "checkpoint-3"), "--method", "sfa",
                                 "--anchor", str(run / "checkpoint-1"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "sfa averages one model with its anchor, but 2 were given" in result.output
    assert not (tmp_path / "o").exists()


def test_check_finite_refuses_a_diverged_checkpoint(tmp_path: Path) -> None:
    run = trainer_run(tmp_path, {1: 1.0, 2: float("inf")}, final=0.0)
    args = ["average", str(run), "--method", "swa", "-o", str(tmp_path / "o")]
    result = runner.invoke(app, [*args, "--check-finite"])
    assert result.exit_code == 2, result.output
    assert "checkpoint-2: tensor 'w': 4 NaN or infinite values" in result.output
    assert not (tmp_path / "o").exists()
    assert runner.invoke(app, [*args, "-q"]).exit_code == 0  # the check is opt-in


def test_average_output_passes_verify_with_its_checksums(tmp_path: Path) -> None:
    run = trainer_run(tmp_path, {1: 1.0, 2: 2.0}, final=0.0)
    result = runner.invoke(app, ["average", str(run), "--method", "swa", "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "checksums.sha256").is_file()
    report = verify_checkpoint(tmp_path / "out")
    assert report.ok, report.problems
    assert report.checksums == "ok" and report.tensors == 1
