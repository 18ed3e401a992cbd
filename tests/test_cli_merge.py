"""`mergekit-like merge` through CliRunner: recipe form, quick form, dry run, JSON, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from mergekit_like.cli.main import app
from typer.testing import CliRunner

from mergekit_like.io import open_checkpoint

runner = CliRunner()


def quick_ties(example: list[Path], out: Path, *extra: str):
    base, *fts = map(str, example)
    return runner.invoke(app, ["merge", "--method", "ties", "--base", base, *fts, "-p", "density=0.5",
                               "-p", "weight=0.5,0.3,0.2", "-o", str(out), *extra])


def test_quick_form_writes_a_complete_loadable_directory(example_models: list[Path], tmp_path: Path) -> None:
    result = quick_ties(example_models, tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tensors"] == 39 and summary["outputs"] == [str(tmp_path / "out")]
    out = tmp_path / "out"
    assert {"config.json", "README.md", "merge_recipe.yml", "model.safetensors"} <= {p.name for p in out.iterdir()}
    with open_checkpoint(out) as ckpt:
        assert len(ckpt) == 39
    card = ModelCard.load(out / "README.md")
    assert card.data.tags == ["merge", "mergekit-like", "ties"]
    assert card.data.library_name == "transformers"
    assert "finetune-1" in card.text and "arxiv.org/abs/2306.01708" in card.text


def test_written_recipe_reruns_to_identical_bytes(example_models: list[Path], tmp_path: Path) -> None:
    assert quick_ties(example_models, tmp_path / "a", "-q").exit_code == 0
    recipe = tmp_path / "a" / "merge_recipe.yml"
    assert yaml.safe_load(recipe.read_text())["merge_method"] == "ties"
    result = runner.invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "b"), "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_dry_run_prints_the_plan_and_writes_nothing(example_models: list[Path], tmp_path: Path) -> None:
    result = quick_ties(example_models, tmp_path / "out", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["tensors"] == 39 and plan["read_bytes"] == 4 * plan["write_bytes"]
    assert plan["parameter_groups"][0]["parameters"]["density"] == [0.5, 0.5, 0.5]
    assert not (tmp_path / "out").exists()
    text = quick_ties(example_models, tmp_path / "out", "--dry-run")
    assert "ties of 3 model(s)" in text.stdout and "39 tensors" in text.stdout


def test_recipe_problems_print_one_line_and_exit_2(example_models: list[Path], tmp_path: Path) -> None:
    base, *fts = map(str, example_models)
    result = runner.invoke(app, ["merge", "--method", "slerp", "--base", base, *fts, "-p", "t=0.5",
                                 "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "slerp needs exactly two models" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["merge", "nonsense.txt", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "give a recipe .yml" in result.output


def test_existing_output_needs_overwrite(example_models: list[Path], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    result = quick_ties(example_models, tmp_path / "out", "-q")
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert quick_ties(example_models, tmp_path / "out", "-q", "--overwrite").exit_code == 0
    assert not (tmp_path / "out" / "keep").exists()


def test_wise_ft_sweep_through_the_cli(example_models: list[Path], tmp_path: Path) -> None:
    base, ft = map(str, example_models[:2])
    result = runner.invoke(app, ["merge", "--method", "wise_ft", "--base", base, ft, "-p", "alpha=0.3,0.6",
                                 "-o", str(tmp_path / "w"), "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["outputs"]) == 2
    assert (tmp_path / "w" / "alpha_0.3" / "README.md").exists()


def test_merge_help_has_an_example() -> None:
    result = runner.invoke(app, ["merge", "--help"])
    assert result.exit_code == 0 and "--method ties" in result.stdout


def test_memory_budget_is_checked_before_any_work(example_models: list[Path], tmp_path: Path) -> None:
    result = quick_ties(example_models, tmp_path / "small", "--memory-budget", "1KB")
    assert result.exit_code == 2 and "memory budget" in result.output
    result = quick_ties(example_models, tmp_path / "words", "--memory-budget", "plenty")
    assert result.exit_code == 2 and "--memory-budget" in result.output
    assert not (tmp_path / "small").exists() and not (tmp_path / "words").exists()
    result = quick_ties(example_models, tmp_path / "ok", "--memory-budget", "8MiB", "-q")
    assert result.exit_code == 0, result.output


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {n: ckpt.read(n) for n in ckpt.names()}


def test_written_recipe_is_resolved_and_reruns_bit_for_bit_from_another_cwd(
    example_models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = tmp_path / "first"
    first.mkdir()
    monkeypatch.chdir(first)
    base, ft1, ft2 = (os.path.relpath(p, first) for p in example_models[:3])
    # mergekit's form, relative paths, the method's defaults left out.
    given = {"merge_method": "ties", "base_model": base, "dtype": "bfloat16",
             "models": [{"model": ft1, "parameters": {"weight": 0.7, "density": 0.4}},
                        {"model": ft2, "parameters": {"weight": 0.3, "density": 0.6}}]}
    Path("recipe.yml").write_text(yaml.safe_dump(given))
    result = runner.invoke(app, ["merge", "recipe.yml", "-o", "out", "-q"])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((first / "out" / "merge_recipe.yml").read_text())
    assert written["base_model"] == str(example_models[0])
    assert [m["model"] for m in written["models"]] == [str(p) for p in example_models[1:3]]
    assert written["parameters"] == {"normalize": True, "density": 1.0, "rescale": False, "lambda": 1.0,
                                     "consensus": "sum", "trim_scope": "tensor", "trim_ties": "sort"}
    assert written["dtype"] == "bfloat16" and written["mergekit_like"]["seed"] == 0

    second = tmp_path / "elsewhere" / "deeper"
    second.mkdir(parents=True)
    monkeypatch.chdir(second)
    result = runner.invoke(app, ["merge", str(first / "out" / "merge_recipe.yml"), "-o", "again", "-q"])
    assert result.exit_code == 0, result.output
    original, rerun = read_all(first / "out"), read_all(second / "again")
    assert original.keys() == rerun.keys()
    assert all(original[n].dtype == rerun[n].dtype and torch.equal(original[n], rerun[n]) for n in original)


def test_freed_memory_is_kept_for_element_wise_merges_only(
    example_models: list[Path], tmp_path: Path, kept_memory_calls: list[None]
) -> None:
    assert quick_ties(example_models, tmp_path / "ties", "--quiet").exit_code == 0
    assert kept_memory_calls == []  # whole-tensor masks: kept memory fragments, RSS grew by a quarter
    base, *fts = map(str, example_models)
    result = runner.invoke(app, ["merge", "--method", "linear", *fts, "-p", "weight=1,1,1", "-o", str(tmp_path / "linear"),
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    assert kept_memory_calls == [None]
