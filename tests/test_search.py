"""The merge search: a known optimum found, a killed search resumed, failures kept, bad input refused."""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from helpers import write_checkpoint
from mergekit_like.cli.main import app
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergekit_like.errors import RecipeError, SearchError
from mergekit_like.search import SearchSettings, run_search, space_from
from mergekit_like.search.space import Range

runner = CliRunner()
TARGET_WEIGHTS = (0.3, 0.7, 0.5)
EVAL = Path(__file__).with_name("search_eval.py")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base, three fine-tunes, and the hidden target: task arithmetic at TARGET_WEIGHTS."""
    root = tmp_path_factory.mktemp("models")
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(8, 8, generator=g), "b": torch.randn(8, generator=g)}
    tunes = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    for name, tensors in [("base", base), *((f"ft{i}", t) for i, t in enumerate(tunes))]:
        write_checkpoint(root / name, tensors)
    target = {k: base[k] + sum(w * (t[k] - base[k]) for w, t in zip(TARGET_WEIGHTS, tunes)) for k in base}
    write_checkpoint(root / "target", target)
    return root


def space_data(models: Path, **weight: object) -> dict:
    searched = weight or {"search": "uniform", "low": 0, "high": 1}
    return {"merge_method": "task_arithmetic", "base_model": str(models / "base"), "dtype": "float32",
            "models": [{"model": str(models / f"ft{i}"), "parameters": {"weight": dict(searched)}} for i in range(3)]}


def distance_to_target(models: Path):
    target = load_file(models / "target" / "model.safetensors")

    def score(path: Path) -> float:
        merged = load_file(path / "model.safetensors")
        return -sum(float((merged[k] - target[k]).norm()) for k in target)

    return score


def test_tpe_finds_a_known_optimum_within_40_trials(models: Path, tmp_path: Path) -> None:
    space = space_from(space_data(models))
    assert [r.name for r in space.ranges] == ["ft0.weight", "ft1.weight", "ft2.weight"]
    result = run_search(space, distance_to_target(models), tmp_path / "out", SearchSettings(trials=40))
    assert result.best_values is not None and len(result.records) == 40
    found = [result.best_values[f"ft{i}.weight"] for i in range(3)]
    assert all(abs(f - t) <= 0.05 for f, t in zip(found, TARGET_WEIGHTS)), found
    lines = (tmp_path / "out" / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 40 and json.loads(lines[-1])["best"] == result.best_score


def test_the_command_writes_trials_the_best_merge_and_a_plot(models: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    (tmp_path / "space.yml").write_text(yaml.safe_dump(space_data(models)))
    command = f"{sys.executable} {EVAL} {{path}} {models / 'target'}"
    result = runner.invoke(app, ["search", str(tmp_path / "space.yml"), "--eval-cmd", command, "--trials", "6",
                                 "--sampler", "random", "--workers", "2", "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert len(summary["trials"]) == 6 and summary["best_trial"] is not None
    best = tmp_path / "out" / "best"
    assert "Found by `mergekit-like search`" in (best / "README.md").read_text()
    recipe = yaml.safe_load((best / "merge_recipe.yml").read_text())
    assert [m["parameters"]["weight"] for m in recipe["models"]] == [
        pytest.approx(summary["best_values"][f"ft{i}.weight"]) for i in range(3)]
    assert (tmp_path / "out" / "search.png").stat().st_size > 10_000
    again = runner.invoke(app, ["search", str(tmp_path / "space.yml"), "--eval-cmd", command, "-o",
                                str(tmp_path / "out")])
    assert again.exit_code != 0 and "--resume" in again.output and "Traceback" not in again.output


def test_a_killed_search_resumes_and_keeps_its_finished_trials(models: Path, tmp_path: Path) -> None:
    (tmp_path / "space.yml").write_text(yaml.safe_dump(space_data(models)))
    out = tmp_path / "out"
    counter = tmp_path / "calls"
    # The eval script kills the search (its grandparent, through the shell) on its 11th call.
    command = f"{sys.executable} {EVAL} {{path}} {models / 'target'} --kill-after 10 --counter {counter}"
    search = [sys.executable, "-c", "from mergekit_like.cli.entry import main; main()", "search",
              str(tmp_path / "space.yml"),
              "--eval-cmd", command, "--trials", "20", "--no-plot", "-o", str(out), "-q"]
    killed = subprocess.run(search, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    first = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(first) == 10
    command = f"{sys.executable} {EVAL} {{path}} {models / 'target'}"
    resumed = runner.invoke(app, ["search", str(tmp_path / "space.yml"), "--eval-cmd", command, "--trials", "20",
                                  "--no-plot", "--resume", "-o", str(out), "--json"])
    assert resumed.exit_code == 0, resumed.output
    trials = json.loads(resumed.output)["trials"]
    assert trials[:10] == first and len(trials) == 20 and all(t["score"] is not None for t in trials)
    # The trial the kill cut short (number 10) is asked again first, with its values, as trial 11.
    assert [t["number"] for t in trials] == [*range(10), *range(11, 21)]


def test_failing_trials_are_kept_with_their_output_and_the_search_goes_on(models: Path, tmp_path: Path) -> None:
    score = distance_to_target(models)

    def picky(path: Path) -> float:
        if load_file(path / "model.safetensors")["b"][0] > 0:  # about half the merges
            raise RuntimeError("the evaluator found nothing to score")
        return score(path)

    result = run_search(space_from(space_data(models)), picky, tmp_path / "out",
                        SearchSettings(trials=12, sampler="random"))
    failed = [r for r in result.records if r.score is None]
    assert 0 < len(failed) < 12 and result.best_values is not None
    log = (tmp_path / "out" / "trials" / f"trial_{failed[0].number}.log").read_text()
    assert "the evaluator found nothing to score" in log


def test_an_eval_command_that_always_fails_stops_the_search_in_one_line(models: Path, tmp_path: Path) -> None:
    (tmp_path / "space.yml").write_text(yaml.safe_dump(space_data(models)))
    result = runner.invoke(app, ["search", str(tmp_path / "space.yml"), "--eval-cmd",
                                 "echo no number here {path}", "--trials", "10", "--no-plot", "-o",
                                 str(tmp_path / "out")])
    assert result.exit_code != 0
    line = " ".join(result.output.split())
    assert "the first 3 trials all failed" in line and "printed no number" in line and "Traceback" not in line
    assert len((tmp_path / "out" / "trials.jsonl").read_text().splitlines()) == 3
    assert "no number here" in (tmp_path / "out" / "trials" / "trial_0.log").read_text()


@pytest.mark.parametrize(("weight", "message"), [
    ({"search": "uniform", "low": 1, "high": 0}, "low 1 is above high 0"),
    ({"search": "log_uniform", "low": 0, "high": 1}, "needs low > 0"),
    ({"search": "normal", "low": 0, "high": 1}, "search must be one of uniform, log_uniform, int, choice"),
    ({"search": "choice", "values": []}, "a choice needs values"),
    ({"search": "uniform", "low": 0, "high": 1, "step": 0.1}, "takes high, low, not step"),
])
def test_bad_ranges_are_refused_before_any_trial(models: Path, weight: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        space_from(space_data(models, **weight))


def test_a_range_the_method_cannot_take_is_refused_before_any_trial(models: Path) -> None:
    data = space_data(models, search="choice", values=[0.5])
    data["parameters"] = {"densty": {"search": "uniform", "low": 0, "high": 1}}
    with pytest.raises(RecipeError, match="densty"):
        space_from(data)
    ties = {**space_data(models, search="choice", values=[0.5]), "merge_method": "ties",
            "parameters": {"density": {"search": "uniform", "low": 0.2, "high": 1.5}}}
    with pytest.raises(RecipeError, match=r"parameters\.density = 1\.5"):
        space_from(ties)


def test_grid_and_gradient_points_and_filters_are_searched(models: Path, tmp_path: Path) -> None:
    data = space_data(models, search="choice", values=[0.5])
    data["models"][0]["parameters"]["weight"] = [0.0, {"search": "uniform", "low": 0, "high": 1}, 1.0]
    data["models"][1]["parameters"]["weight"] = [{"filter": "a", "value": {"search": "int", "low": 0, "high": 2}},
                                                 {"value": 1.0}]
    space = space_from(data)
    assert [r.name for r in space.ranges] == ["ft0.weight[1]", "ft1.weight[0].value", "ft2.weight"]
    candidate = space.candidate({"ft0.weight[1]": 0.25, "ft1.weight[0].value": 2, "ft2.weight": 0.5})
    assert candidate["models"][0]["parameters"]["weight"] == [0.0, 0.25, 1.0]
    assert candidate["models"][1]["parameters"]["weight"][0] == {"filter": "a", "value": 2}
    result = run_search(space, distance_to_target(models), tmp_path / "out",
                        SearchSettings(trials=100, sampler="grid", grid_points=3))
    assert len(result.records) == 3 * 3 * 1  # the grid has 9 points, whatever the trials asked
    assert Range("x", "int", 0, 10).grid(3) == [0, 5, 10]


def test_the_cmaes_sampler_runs(models: Path, tmp_path: Path) -> None:
    result = run_search(space_from(space_data(models)), distance_to_target(models), tmp_path / "out",
                        SearchSettings(trials=8, sampler="cmaes"))
    assert result.best_values is not None and len(result.records) == 8


def test_an_unreachable_ray_cluster_is_one_line(models: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    (tmp_path / "space.yml").write_text(yaml.safe_dump(space_data(models)))
    started = time.monotonic()
    result = runner.invoke(app, ["search", str(tmp_path / "space.yml"), "--eval-cmd", "true {path}",
                                 "--ray-address", "127.0.0.1:9", "--no-plot", "-o", str(tmp_path / "out")])
    assert result.exit_code != 0 and time.monotonic() - started < 30
    assert "cannot reach the Ray cluster at 127.0.0.1:9" in " ".join(result.output.split())


def test_settings_problems_are_reported_together() -> None:
    with pytest.raises(Exception, match=r"--trials must be at least 1.*--sampler must be one of"):
        SearchSettings(trials=0, sampler="bayes")
    with pytest.raises(SearchError, match=r"holds no study\.db"):
        run_search(load_space_for_resume(), lambda p: 0.0, Path("/nonexistent-search"), SearchSettings(),
                   resume=True)


def load_space_for_resume():
    return space_from({"merge_method": "linear", "models": [
        {"model": "a", "parameters": {"weight": {"search": "uniform", "low": 0, "high": 1}}},
        {"model": "b", "parameters": {"weight": 1.0}}]})



@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """A real local Ray cluster, two worker CPUs on 127.0.0.1, stopped afterwards: its address."""
    pytest.importorskip("ray")
    ray_cli = Path(sys.executable).with_name("ray")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    start = [str(ray_cli), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus",
             "2", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp]
    started = subprocess.run(start, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(ray_cli), "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_tpe_finds_the_optimum_on_a_real_local_ray_cluster(models: Path, tmp_path: Path, ray_cluster: str) -> None:
    (tmp_path / "space.yml").write_text(yaml.safe_dump(space_data(models)))
    command = f"{sys.executable} {EVAL} {{path}} {models / 'target'}"
    result = runner.invoke(app, ["search", str(tmp_path / "space.yml"), "--eval-cmd", command, "--trials", "40",
                                 "--ray-address", ray_cluster, "--no-plot", "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert len(summary["trials"]) == 40 and all(t["score"] is not None for t in summary["trials"])
    found = [summary["best_values"][f"ft{i}.weight"] for i in range(3)]
    assert all(abs(f - t) <= 0.05 for f, t in zip(found, TARGET_WEIGHTS)), found
    assert (tmp_path / "out" / "best" / "model.safetensors").is_file()


def test_a_seeded_search_in_parallel_asks_the_same_values_however_the_workers_finish(
        models: Path, tmp_path: Path) -> None:
    score = distance_to_target(models)

    def uneven(path: Path) -> float:
        time.sleep(random.random() * 0.3)  # workers finish in a different order each run
        return score(path)

    runs = [run_search(space_from(space_data(models)), uneven, tmp_path / f"out{i}",
                       SearchSettings(trials=14, workers=3)) for i in range(2)]
    assert [r.values for r in runs[0].records] == [r.values for r in runs[1].records]
    assert [r.number for r in runs[0].records] == list(range(14))


def test_a_batched_search_merges_several_candidates_per_read_pass(models: Path, tmp_path: Path) -> None:
    result = run_search(space_from(space_data(models)), distance_to_target(models), tmp_path / "out",
                        SearchSettings(trials=10, batch=4, sampler="random"))
    assert [r.number for r in result.records] == list(range(10)) and all(r.score is not None for r in result.records)
    alone = run_search(space_from(space_data(models)), distance_to_target(models), tmp_path / "alone",
                       SearchSettings(trials=10, sampler="random"))
    assert [r.score for r in result.records] == [r.score for r in alone.records]


def test_the_greedy_soup_is_a_search_strategy_with_soup_greedys_choices(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    target = {"w": torch.randn(6, 6, generator=g)}
    # Ingredients near the target (good alone) and far from it; the soup of the near ones is best.
    offsets = [0.3, 0.35, 2.0, 0.4]
    for i, scale in enumerate(offsets):
        write_checkpoint(tmp_path / f"run{i}", {"w": target["w"] + scale * torch.randn(6, 6, generator=g)})
    write_checkpoint(tmp_path / "target", target)

    def score(path: Path) -> float:
        return -float((load_file(path / "model.safetensors")["w"] - target["w"]).norm())

    choice = {"search": "choice", "values": [0, 1]}
    space = space_from({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(tmp_path / f"run{i}"), "parameters": {"weight": dict(choice)}} for i in range(4)]})
    result = run_search(space, score, tmp_path / "out", SearchSettings(sampler="greedy-soup", workers=2))
    from mergekit_like.soup import greedy_soup

    expected = greedy_soup([str(tmp_path / f"run{i}") for i in range(4)], score)
    kept = {f"run{i}.weight" for i in range(4) if result.best_values and result.best_values[f"run{i}.weight"] == 1}
    assert kept == {f"{Path(m).name}.weight" for m in expected.kept}
    assert result.best_score == pytest.approx(expected.score, abs=1e-6)
    assert len(result.records) == 4 + 3  # each alone, then each addition
    assert 1 < len(kept) < 4  # the far ingredient is dropped, another one kept

    def never(path: Path) -> float:
        raise AssertionError("a resumed greedy soup scores again what it scored before")

    resumed = run_search(space, never, tmp_path / "out", SearchSettings(sampler="greedy-soup"), resume=True)
    assert resumed.best_values == result.best_values and len(resumed.records) == 7

    # A run killed with trials enqueued and not started leaves them waiting in the study: a resume
    # drops them instead of asking one in place of a point it needs.
    import optuna

    lines = (tmp_path / "out" / "trials.jsonl").read_text().splitlines()
    (tmp_path / "out" / "trials.jsonl").write_text("\n".join(lines[:4]) + "\n")  # the additions "not run"
    study = optuna.load_study(study_name="merge-search", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    study.enqueue_trial({f"run{i}.weight": 0 for i in range(4)}, skip_if_exists=False)  # never a soup point
    again = run_search(space, score, tmp_path / "out", SearchSettings(sampler="greedy-soup"), resume=True)
    assert again.best_values == result.best_values and len(again.records) == 7
    assert all(r.values != {f"run{i}.weight": 0 for i in range(4)} for r in again.records[4:])
    with pytest.raises(RecipeError, match="choice of 0"):
        run_search(space_from(space_data(tmp_path)), score, tmp_path / "bad", SearchSettings(sampler="greedy-soup"))


def test_overwrite_never_removes_a_model_the_search_merges(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    g = torch.Generator().manual_seed(5)
    for name in ("base", "a", "b"):
        write_checkpoint(out / name, {"w": torch.randn(4, 4, generator=g)})
    space = {"merge_method": "task_arithmetic", "base_model": str(out / "base"), "models": [
        {"model": str(out / m), "parameters": {"weight": {"search": "uniform", "low": 0, "high": 1}}} for m in "ab"]}
    (tmp_path / "space.yml").write_text(yaml.safe_dump(space))
    result = runner.invoke(app, ["search", str(tmp_path / "space.yml"), "--eval-cmd", "echo 1 {path}", "--trials",
                                 "2", "--no-plot", "-o", str(out), "--overwrite"])
    assert result.exit_code != 0 and "would replace input" in " ".join(result.output.split())
    assert all((out / name / "model.safetensors").is_file() for name in ("base", "a", "b"))
