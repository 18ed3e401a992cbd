"""plan_average: settings checked all at once before any path is resolved; discovery; the command's errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_checkpoint
from mergekit_like.cli.main import app
from typer.testing import CliRunner

from mergekit_like.averaging import AverageSettings, list_average, plan_average
from mergekit_like.errors import RecipeError

runner = CliRunner()


def make_run(tmp_path: Path, steps: list[int], config: bool = True) -> Path:
    run = tmp_path / "run"
    for step in steps:
        write_checkpoint(run / f"checkpoint-{step}", {"w": torch.full((4,), float(step))},
                         config={"model_type": "llama"} if config else None)
    return run


class Recording:
    """A resolver that records what it was asked to resolve."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, ref: str) -> Path:
        self.asked.append(ref)
        return Path(ref)


@pytest.mark.parametrize(("settings", "problems"), [
    (AverageSettings("mean"), ["unknown averaging method 'mean' (known: ema, power_ema, phema, swa, lawa, sfa)"]),
    (AverageSettings("ema"), ["ema needs --decay or --half-life"]),
    (AverageSettings("ema", decays=(0.9, 1.0, float("nan")), half_lives=(0.0, float("inf"), 1e300)),
     ["decay must be in [0, 1), got 1.0", "decay must be in [0, 1), got nan",
      "half_life must be positive and finite, got 0.0", "half_life must be positive and finite, got inf",
      "half_life 1e+300 is too long: its per-step decay rounds to 1"]),
    (AverageSettings("swa", start=10, end=5), ["SWA window ends (5) before it starts (10)"]),
    (AverageSettings("lawa", k=0), ["k must be at least 1, got 0"]),
    (AverageSettings("lawa", nu=-1), ["nu must be at least 0, got -1"]),
    (AverageSettings("sfa", beta=float("nan")), ["beta must be in [0, 1], got nan"]),
])
def test_every_problem_of_the_settings_is_listed_before_any_path_is_resolved(
    settings: AverageSettings, problems: list[str]
) -> None:
    resolver = Recording()
    with pytest.raises(RecipeError) as info:
        plan_average(["alice/run"], settings, anchor="alice/anchor", resolve_model=resolver)
    assert info.value.problems == problems
    assert resolver.asked == []  # a Hub id is not even fetched


def test_sfa_input_rules(tmp_path: Path) -> None:
    run = make_run(tmp_path, [1, 2, 3])
    with pytest.raises(RecipeError, match="sfa needs --anchor"):
        plan_average([str(run)], AverageSettings("sfa"))
    with pytest.raises(RecipeError, match="sfa averages one model with its anchor, but 2 were given"):
        plan_average([str(run / "checkpoint-2"), str(run / "checkpoint-3")], AverageSettings("sfa"),
                     anchor=str(run / "checkpoint-1"))
    plan = plan_average([str(run)], AverageSettings("sfa", beta=0.25), anchor=str(run / "checkpoint-1"))
    assert [(p.step, p.path.name) for p in plan.points] == [(0, "checkpoint-1"), (1, "checkpoint-3")]
    assert [o.label for o in plan.outputs] == ["sfa_beta0.25"]


def test_a_plan_knows_whether_its_outputs_get_a_config(tmp_path: Path) -> None:
    with_config = plan_average([str(make_run(tmp_path / "a", [1, 2]))], AverageSettings("swa"))
    without = plan_average([str(make_run(tmp_path / "b", [1, 2], config=False))], AverageSettings("swa"))
    assert with_config.has_config and not without.has_config
    assert [p.step for p in with_config.points] == [1, 2] and with_config.warnings == ()


def test_weights_at_a_run_directorys_root_are_a_warning_of_the_plan(tmp_path: Path) -> None:
    run = make_run(tmp_path, [10, 20])
    write_checkpoint(run, {"w": torch.zeros(4)})
    plan = plan_average([str(run)], AverageSettings("lawa", k=1))
    assert plan.warnings == (f"{run}: ignoring the weights at its root (model.safetensors); averaging its 2 "
                             f"step-named checkpoints (list checkpoints explicitly to choose)",)
    assert [plan.points[i].step for i in plan.outputs[0].indices] == [20]


def test_a_listing_shows_the_checkpoints_whatever_the_settings(tmp_path: Path) -> None:
    run = make_run(tmp_path, [1, 2])
    listing = list_average([str(run)], AverageSettings("swa", start=10, end=5))
    assert [p.step for p in listing.points] == [1, 2] and listing.outputs == ()
    assert listing.unshown == "SWA window ends (5) before it starts (10)"
    with pytest.raises(RecipeError, match="unknown averaging method"):
        list_average([str(run)], AverageSettings("mean"))


def test_options_are_those_of_the_method_as_they_would_be_typed() -> None:
    ema = AverageSettings("ema", decays=(0.99, 0.999), half_lives=(100.0,), k=3, end=4)
    assert ema.options() == {"decay": "0.99,0.999", "half_life": "100", "per_checkpoint": False}
    warm = AverageSettings("ema", decays=(0.99,), warmup="inv_gamma", power=0.75, start=10)
    assert warm.options() == {"decay": "0.99", "per_checkpoint": False, "warmup": "inv_gamma", "inv_gamma": 1.0,
                              "power": 0.75, "min_decay": 0.0, "start": 10}
    assert AverageSettings("phema", sigma_rels=(0.05, 0.1)).options() == {"sigma_rel": "0.05,0.1"}
    assert AverageSettings("ema", decays=(0.12345678,)).options()["decay"] == "0.12345678"
    assert AverageSettings("swa", start=5).options() == {"start": 5}
    assert AverageSettings("lawa").options() == {"k": 5, "nu": 0, "every_step": False}


@pytest.mark.parametrize(("arguments", "message"), [
    (["--method", "swa", "--start", "10", "--end", "5"], "SWA window ends (5) before it starts (10)"),
    (["--method", "ema", "--half-life", "inf"], "half_life must be positive and finite, got inf"),
    (["--method", "sfa"], "sfa needs --anchor"),
    (["--method", "median"], "unknown averaging method 'median'"),
])
def test_the_command_prints_one_line_for_bad_settings(tmp_path: Path, arguments: list[str], message: str) -> None:
    run = make_run(tmp_path, [1, 2])
    result = runner.invoke(app, ["average", str(run), *arguments, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
