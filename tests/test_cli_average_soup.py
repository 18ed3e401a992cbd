"""`mergekit-like average` and `mergekit-like soup` through CliRunner."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_checkpoint
from huggingface_hub import ModelCard
from mergekit_like.cli.main import app
from typer.testing import CliRunner

from mergekit_like.hub import push
from mergekit_like.io import open_checkpoint
from mergekit_like.soup import command_evaluator, greedy_soup

pytest.register_assert_rewrite("fake_hub")
from fake_hub import FakeHub  # noqa: E402

pytest_plugins = ["fake_hub"]
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

runner = CliRunner()
TOKEN = "hf_writer"  # the fake Hub's user alice, who may write to alice/*


def value_of(path: Path) -> float:
    with open_checkpoint(path) as ckpt:
        return ckpt.read("w")[0].item()


def make_run(tmp_path: Path, steps: list[int]) -> Path:
    for i, step in enumerate(steps):
        write_checkpoint(tmp_path / "run" / f"checkpoint-{step}", {"w": torch.full((4,), float(i))},
                         config={"model_type": "llama"})
    return tmp_path / "run"


def test_average_list_prints_checkpoints_in_order_and_the_memory_bound(tmp_path: Path) -> None:
    run = make_run(tmp_path, [300, 100, 200])
    result = runner.invoke(app, ["average", str(run), "--method", "lawa", "--k", "2", "--list", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [c["step"] for c in data["checkpoints"]] == [100, 200, 300]
    # 4 float32 elements x (1 state + the read tensor + 2 float32 temporaries + the cast written)
    assert data["outputs"][0]["steps"] == [200, 300] and data["memory_bound_bytes"] == 4 * 4 * 5


def test_average_ema_with_two_decays_writes_two_outputs_with_cards(tmp_path: Path) -> None:
    run = make_run(tmp_path, [1, 2, 3])
    result = runner.invoke(app, ["average", str(run), "--method", "ema", "--decay", "0.5,0.9",
                                 "--per-checkpoint", "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    outputs = [Path(p) for p in json.loads(result.stdout)["outputs"]]
    assert [p.name for p in outputs] == ["ema_0.5", "ema_0.9"]
    e = 0.0
    for value in (1.0, 2.0):
        e = 0.5 * e + 0.5 * value
    assert value_of(outputs[0]) == e
    card = ModelCard.load(outputs[0] / "README.md")
    assert "ema" in card.data.tags and "checkpoint-3" in card.text


def test_average_sfa_pulls_toward_the_anchor(tmp_path: Path) -> None:
    run = make_run(tmp_path, [1, 2, 3])  # values 0, 1, 2
    result = runner.invoke(app, ["average", str(run / "checkpoint-3"), "--method", "sfa", "--beta", "0.25",
                                 "--anchor", str(run / "checkpoint-1"), "-o", str(tmp_path / "sfa"), "-q"])
    assert result.exit_code == 0, result.output
    assert value_of(tmp_path / "sfa") == 0.75 * 2.0 + 0.25 * 0.0


def test_average_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["average", str(tmp_path / "empty"), "--method", "ema", "--decay", "0.9",
                                 "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "holds no checkpoints" in result.output
    run = make_run(tmp_path, [1, 2])
    result = runner.invoke(app, ["average", str(run), "--method", "ema", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "needs --decay or --half-life" in result.output


def soup_models(tmp_path: Path, values: list[float]) -> list[str]:
    return [str(write_checkpoint(tmp_path / f"m{i}", {"w": torch.full((2,), v)}, config={"model_type": "llama"}))
            for i, v in enumerate(values)]


# Scores a checkpoint by -(w - 2)^2: the best soup has mean w closest to 2.
# Reads the file with the standard library only, so each evaluation starts fast.
EVAL = """
import json, struct, sys
with open(sys.argv[1] + "/model.safetensors", "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    f.seek(8 + n + header["w"]["data_offsets"][0])
    (w,) = struct.unpack("<f", f.read(4))
print("evaluating", sys.argv[1])
print(-(w - 2.0) ** 2)
"""


def test_greedy_soup_keeps_only_improving_ingredients(tmp_path: Path) -> None:
    script = tmp_path / "eval.py"
    script.write_text(EVAL)
    models = soup_models(tmp_path, [1.0, 3.0, 10.0, 2.5])
    # alone: 1 -> -1, 3 -> -1, 10 -> -64, 2.5 -> -0.25. Sorted: 2.5, 1 (tie with 3, stable), 3, 10.
    # soup {2.5, 1} = 1.75 -> -0.0625 kept; {2.5, 1, 3} = 2.1667 -> -0.0278 kept; + 10 -> 4.125 dropped.
    result = greedy_soup(models, command_evaluator(f"{sys.executable} {script} {{path}}"))
    assert [Path(m).name for m in result.kept] == ["m3", "m0", "m1"]
    assert [s.kept for s in result.steps] == [True, True, True, False]
    assert result.score == pytest.approx(-((2.5 + 1 + 3) / 3 - 2) ** 2, rel=1e-5)  # float32 soup


def test_soup_cli_greedy_writes_scores_and_card(tmp_path: Path) -> None:
    script = tmp_path / "eval.py"
    script.write_text(EVAL)
    models = soup_models(tmp_path, [1.0, 10.0])
    result = runner.invoke(app, ["soup", *models, "--greedy", "--eval-cmd", f"{sys.executable} {script} {{path}}",
                                 "-o", str(tmp_path / "soup"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["ingredients"] == [models[0]]
    scores = json.loads((tmp_path / "soup" / "soup_scores.json").read_text())
    assert [s["kept"] for s in scores["steps"]] == [True, False]
    assert value_of(tmp_path / "soup") == 1.0
    assert "Greedy soup: kept 1 of 2" in (tmp_path / "soup" / "README.md").read_text()
    assert not list(tmp_path.glob("greedy-soup-*"))  # candidate soups are cleaned up


def test_uniform_soup_cli(tmp_path: Path) -> None:
    models = soup_models(tmp_path, [1.0, 2.0, 6.0])
    result = runner.invoke(app, ["soup", *models, "-o", str(tmp_path / "soup"), "-q"])
    assert result.exit_code == 0, result.output
    assert value_of(tmp_path / "soup") == 3.0


def test_failing_or_silent_eval_command_is_a_clear_error(tmp_path: Path) -> None:
    models = soup_models(tmp_path, [1.0, 2.0])
    failing = runner.invoke(app, ["soup", *models, "--greedy", "--eval-cmd", "echo broken >&2; exit 3 # {path}",
                                  "-o", str(tmp_path / "a")])
    assert failing.exit_code == 2 and "failed (exit 3)" in failing.output and "broken" in failing.output
    silent = runner.invoke(app, ["soup", *models, "--greedy", "--eval-cmd", "echo no score here {path}",
                                 "-o", str(tmp_path / "b")])
    assert silent.exit_code == 2 and "printed no number" in silent.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# Scores a checkpoint by the loss (w - 2)^2, lower is better.
LOSS = EVAL.replace("print(-(w - 2.0) ** 2)", "print((w - 2.0) ** 2)")


def test_soup_cli_lower_is_better_keeps_the_lowest_loss(tmp_path: Path) -> None:
    script = tmp_path / "loss.py"
    script.write_text(LOSS)
    models = soup_models(tmp_path, [1.0, 10.0])  # losses 1 and 64; their soup (5.5) 12.25
    result = runner.invoke(app, ["soup", *models, "--greedy", "--lower-is-better",
                                 "--eval-cmd", f"{sys.executable} {script} {{path}}", "-o", str(tmp_path / "s"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    greedy = json.loads(result.stdout)["greedy"]
    assert greedy["kept"] == [models[0]] and greedy["score"] == 1.0  # higher-is-better would keep m1 alone
    assert value_of(tmp_path / "s") == 1.0


def test_greedy_soup_deletes_each_candidate_right_after_scoring(tmp_path: Path) -> None:
    models = soup_models(tmp_path, [1.0, 3.0, 10.0, 2.5])
    on_disk: list[list[str]] = []

    def evaluate(path: Path) -> float:
        if path.name.startswith("soup-"):
            on_disk.append(sorted(p.name for p in path.parent.iterdir()))
        return -((value_of(path) - 2.0) ** 2)

    result = greedy_soup(models, evaluate, workdir=tmp_path)
    assert [s.kept for s in result.steps] == [True, True, True, False]
    assert on_disk == [["soup-1"], ["soup-2"], ["soup-3"]]  # never an earlier candidate beside the current
    kept = tmp_path / "kept"
    kept.mkdir()
    greedy_soup(models, evaluate, workdir=tmp_path, keep_soups=kept)
    assert sorted(p.name for p in kept.iterdir()) == ["soup-1", "soup-2", "soup-3"]


# -- model cards and Hub inputs ----------------------------------------------------------


def licensed_run(tmp_path: Path, licenses: list[str]) -> Path:
    run = tmp_path / "run"
    for step, license_ in enumerate(licenses, 1):
        path = write_checkpoint(run / f"checkpoint-{step}", {"w": torch.full((4,), float(step))},
                                config={"model_type": "llama"})
        (path / "README.md").write_text(f"---\nlicense: {license_}\n---\n# checkpoint\n")
    return run


def test_average_card_states_the_common_license_and_the_command_without_the_token(tmp_path: Path) -> None:
    run = licensed_run(tmp_path, ["mit", "mit"])
    secret = "hf_not_to_be_written"
    result = runner.invoke(app, ["average", str(run), "--method", "ema", "--decay", "0.5", "-o",
                                 str(tmp_path / "out"), "-q", "--token", secret])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out" / "README.md").read_text()
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.license == "mit"
    assert "## Reproduce" in text
    assert f"mergekit-like average {run} --method ema --decay 0.5 -o OUTPUT" in text
    assert secret not in text and "--token" not in text
    mixed = licensed_run(tmp_path / "mixed", ["mit", "apache-2.0"])
    result = runner.invoke(app, ["average", str(mixed), "--method", "swa", "-o", str(tmp_path / "m"), "-q"])
    assert result.exit_code == 0, result.output
    assert ModelCard.load(tmp_path / "m" / "README.md").data.license is None  # inputs disagree


def hub_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """checkpoint-1 and -2 (values 1 and 2, apache-2.0), pushed as alice/ckpt-1 and alice/ckpt-2."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run = licensed_run(tmp_path, ["apache-2.0", "apache-2.0"])
    local = [run / "checkpoint-1", run / "checkpoint-2"]
    for step, path in enumerate(local, 1):
        push(path, f"alice/ckpt-{step}")
    return local


def test_average_reads_checkpoints_and_the_anchor_from_the_hub(fake_hub: FakeHub, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _, second = hub_checkpoints(tmp_path, monkeypatch)
    result = runner.invoke(app, ["average", "alice/ckpt-1", "alice/ckpt-2@main", "--method", "swa",
                                 "-o", str(tmp_path / "swa"), "-q"])
    assert result.exit_code == 0, result.output
    assert value_of(tmp_path / "swa") == 1.5
    card = ModelCard.load(tmp_path / "swa" / "README.md")
    assert card.data.base_model == ["alice/ckpt-1", "alice/ckpt-2"]
    assert card.data.license == "apache-2.0"
    assert f"commit {fake_hub.head('alice/ckpt-1')}" in card.text
    result = runner.invoke(app, ["average", str(second), "--method", "sfa", "--beta", "0.25",
                                 "--anchor", "alice/ckpt-1", "-o", str(tmp_path / "sfa"), "-q"])
    assert result.exit_code == 0, result.output
    assert value_of(tmp_path / "sfa") == 0.75 * 2.0 + 0.25 * 1.0
    assert "alice/ckpt-1" in ModelCard.load(tmp_path / "sfa" / "README.md").data.base_model


def test_a_hub_training_run_is_named_by_repo_and_folder_never_by_cache_path(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    from huggingface_hub import HfApi

    run = licensed_run(tmp_path, ["mit", "mit"])
    api = HfApi(token=TOKEN)  # a raw upload: a run directory is not an output `push` accepts
    api.create_repo("alice/run")
    api.upload_folder(folder_path=run, repo_id="alice/run")
    result = runner.invoke(app, ["average", "alice/run", "--method", "swa", "-o", str(tmp_path / "swa"), "-q"])
    assert result.exit_code == 0, result.output
    assert value_of(tmp_path / "swa") == 1.5
    card = ModelCard.load(tmp_path / "swa" / "README.md")
    assert card.data.base_model == ["alice/run"]
    assert f"folder checkpoint-1, commit {fake_hub.head('alice/run')}" in card.text
    written = (tmp_path / "swa" / "README.md").read_text()
    assert "alice/run/checkpoint-2" in written  # the recipe in the card
    assert str(Path.home()) not in written and "snapshots" not in written


def test_soup_card_names_hub_commits_and_the_common_license(fake_hub: FakeHub, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _, second = hub_checkpoints(tmp_path, monkeypatch)
    result = runner.invoke(app, ["soup", "alice/ckpt-1", str(second), "-o", str(tmp_path / "soup"), "-q"])
    assert result.exit_code == 0, result.output
    assert value_of(tmp_path / "soup") == 1.5
    card = ModelCard.load(tmp_path / "soup" / "README.md")
    assert card.data.license == "apache-2.0"
    assert f"commit {fake_hub.head('alice/ckpt-1')}" in card.text


def test_a_greedy_soup_removes_the_candidate_a_killed_run_left_behind(tmp_path: Path) -> None:
    import subprocess

    models = soup_models(tmp_path, [1.0, 3.0])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f"greedy-soup-{int(dead.stdout)}-abc" / "soup-1"  # as a run killed while scoring leaves it
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"\0" * 1024)
    alive = tmp_path / f"greedy-soup-{os.getpid()}-xyz"  # a run still going (this process) is left alone
    alive.mkdir()
    greedy_soup(models, lambda path: -value_of(path), workdir=tmp_path)
    assert not left.parent.exists() and alive.exists()
    assert [p.name for p in tmp_path.glob("greedy-soup-*")] == [alive.name]  # and this run's own is gone
