"""``mergekit-like merge`` typed as mergekit-yaml is typed: its output argument and its options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from mergekit_like.cli.main import app
from safetensors.torch import load_file
from typer.testing import CliRunner

GOLDEN = Path(__file__).parent / "data" / "mergekit_golden"
MODELS = GOLDEN / "models" / "f32"
runner = CliRunner()


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump({
        "slices": [{"sources": [{"model": str(MODELS / "ft1"), "layer_range": [0, 2]}]},
                   {"sources": [{"model": str(MODELS / "ft2"), "layer_range": [1, 3]}]}],
        "merge_method": "passthrough", "dtype": "float16"}))
    return path


def merge(*args: str) -> str:
    result = runner.invoke(app, ["merge", *args])
    return f"{result.exit_code}\n{result.output}"


def test_the_output_is_the_last_argument_as_for_mergekit_yaml(recipe: Path, tmp_path: Path) -> None:
    assert merge(str(recipe), str(tmp_path / "out"), "--quiet").startswith("0\n")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4
    written = yaml.safe_load((tmp_path / "out" / "merge_recipe.yml").read_text())
    assert written["dtype"] == "float16" and "compute_dtype" not in written


def test_two_different_outputs_are_refused(recipe: Path, tmp_path: Path) -> None:
    output = merge(str(recipe), str(tmp_path / "a"), "-o", str(tmp_path / "b"))
    assert output.startswith("2\n") and "two outputs given" in output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_mergekit_yaml_options(recipe: Path, tmp_path: Path) -> None:
    source = tmp_path / "with_tokenizer"
    shutil.copytree(MODELS / "ft1", source)
    (source / "tokenizer.json").write_text("{}")
    text = recipe.read_text().replace(str(MODELS / "ft1"), str(source))
    recipe.write_text(text)
    output = merge(str(recipe), str(tmp_path / "out"), "--no-copy-tokenizer", "--out-shard-size", "1K",
                   "--random-seed", "3", "--lazy-unpickle", "--no-write-model-card", "--quiet")
    assert output.startswith("0\n"), output
    out = tmp_path / "out"
    assert not (out / "tokenizer.json").exists() and not (out / "README.md").exists()
    assert len(list(out.glob("*.safetensors"))) > 1  # 1K shards
    assert yaml.safe_load((out / "merge_recipe.yml").read_text())["mergekit_like"]["seed"] == 3
    merge(str(recipe), str(tmp_path / "again"), "--quiet")
    assert (tmp_path / "again" / "tokenizer.json").exists() and (tmp_path / "again" / "README.md").exists()


def test_trust_remote_code_is_refused_with_its_reason(recipe: Path, tmp_path: Path) -> None:
    output = merge(str(recipe), str(tmp_path / "out"), "--trust-remote-code")
    assert output.startswith("2\n") and "never runs a model's code" in output


def test_unknown_options_stay_errors(recipe: Path, tmp_path: Path) -> None:
    assert merge(str(recipe), str(tmp_path / "out"), "--no-such-option").startswith("2\n")


def test_allow_crimes(tmp_path: Path) -> None:
    mistral = tmp_path / "mistral"
    shutil.copytree(MODELS / "ft2", mistral)
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "parameters": {"weight": 1.0},
                                    "models": [str(MODELS / "ft1"), str(mistral)]}))
    refused = merge(str(path), str(tmp_path / "out"))
    assert refused.startswith("2\n") and "different architectures" in refused and "--allow-crimes" in refused
    assert merge(str(path), str(tmp_path / "out"), "--allow-crimes", "--quiet").startswith("0\n")


def test_a_multi_document_recipe_from_the_command_line(tmp_path: Path) -> None:
    case = (GOLDEN / "cases" / "multi_doc_linear_of_merges" / "recipe.yml").read_text()
    path = tmp_path / "recipe.yml"
    path.write_text(case.replace("/tmp/mkref/golden/models", str(GOLDEN / "models")))
    assert merge(str(path), str(tmp_path / "out"), "--quiet").startswith("0\n")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    theirs = load_file(GOLDEN / "cases" / "multi_doc_linear_of_merges" / "expected.safetensors")
    assert all(torch.equal(ours[n], theirs[n]) for n in theirs)
    written = (tmp_path / "out" / "merge_recipe.yml").read_text()
    assert written.count("\n---\n") == 2 and "name: slerp_ft1_ft2" in written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yml"]


def test_more_arguments_than_a_recipe_and_an_output_are_refused(recipe: Path, tmp_path: Path) -> None:
    output = merge(str(recipe), str(tmp_path / "out"), str(tmp_path / "extra"))
    words = " ".join(output.replace("│", " ").split())  # the usage error's box wraps the line
    assert output.startswith("2\n") and "1 more argument(s)" in words
