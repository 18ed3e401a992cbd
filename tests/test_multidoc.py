"""Recipes of several documents: named merges used by later ones, checked before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_like.card import recipe_set_text
from mergekit_like.errors import MergekitLikeError, RecipeError
from mergekit_like.merge.multidoc import load_recipe_set, merge_documents

MODELS = Path(__file__).parent / "data" / "mergekit_golden" / "models" / "f32"
A, B, C = (str(MODELS / n) for n in ("ft1", "ft2", "ft3"))


def linear(name: str | None, *models: str) -> dict:
    doc = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]}
    return ({"name": name} if name is not None else {}) | doc


def write(tmp_path: Path, *documents: dict) -> Path:
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return path


def test_documents_run_in_dependency_order_whatever_their_order(tmp_path: Path) -> None:
    path = write(tmp_path, linear(None, "ab", "abc"), linear("abc", "ab", C), linear("ab", A, B))
    recipes = load_recipe_set(path)
    assert [d.name for d in recipes.documents] == ["ab", "abc", None]
    assert recipes.final.needs == ("ab", "abc")


def test_named_merges_are_used_as_models_and_cleaned_up(tmp_path: Path) -> None:
    path = write(tmp_path, linear("ab", A, B), linear(None, "ab", C))
    merge_documents(load_recipe_set(path), tmp_path / "out")
    a, b, c = (load_file(Path(m) / "model.safetensors") for m in (A, B, C))
    out = load_file(tmp_path / "out" / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(out[name], ((a[name] + b[name]) / 2 + c[name]) / 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yml"]  # no intermediates left


def test_kept_intermediates_and_the_written_recipe_rerun_the_same(tmp_path: Path) -> None:
    path = write(tmp_path, linear("ab", A, B), linear(None, "ab", C))
    recipes = load_recipe_set(path)
    merge_documents(recipes, tmp_path / "out", keep_intermediates=tmp_path / "kept")
    assert (tmp_path / "kept" / "ab" / "model.safetensors").is_file()
    written = tmp_path / "written.yml"
    written.write_text(recipe_set_text(recipes))
    again = load_recipe_set(written)
    assert [d.name for d in again.documents] == ["ab", None] and again.final.needs == ("ab",)
    merge_documents(again, tmp_path / "again")
    first, second = (load_file(tmp_path / d / "model.safetensors") for d in ("out", "again"))
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_a_failed_document_leaves_no_intermediates(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}")
    path = write(tmp_path, linear("ab", A, B), linear(None, "ab", str(tmp_path / "broken")))
    with pytest.raises(MergekitLikeError):
        merge_documents(load_recipe_set(path), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "recipe.yml"]


@pytest.mark.parametrize("documents, expected", [
    ([linear("x", "y"), linear("y", "x"), linear(None, "x")], "cycle: x -> y -> x"),
    ([linear("ab", A, B), linear(None, "abd", C)], "names 'abd', which is neither a named document"),
    ([linear("ab", A, B), linear("ab", A, C), linear(None, "ab")], "the name 'ab' is given twice"),
    ([linear(None, A, B), linear(None, A, C)], "only one document may be unnamed"),
    ([linear("ab", A, B), linear("unused", A, C), linear(None, "ab", C)], "used by no other document"),
    ([linear("ab", A, B), {"merge_method": "linear", "models": ["ab"], "bogus": 1}], "document 2: unknown key"),
])
def test_bad_sets_are_refused_before_any_work(tmp_path: Path, documents: list[dict], expected: str) -> None:
    with pytest.raises(RecipeError, match=expected):
        load_recipe_set(write(tmp_path, *documents))


@pytest.mark.parametrize("name", ["", "..", "a/b", "/abs"])
def test_document_names_must_be_plain_directory_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(RecipeError, match="must be a plain directory name"):
        load_recipe_set(write(tmp_path, linear(name, A, B), linear(None, name, C)))


def test_an_existing_output_is_found_before_the_first_merge(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("kept")
    path = write(tmp_path, linear("ab", A, B), linear(None, "ab", C))
    with pytest.raises(MergekitLikeError, match="exists"):
        merge_documents(load_recipe_set(path), tmp_path / "out", keep_intermediates=tmp_path / "kept")
    assert not (tmp_path / "kept").exists() and (tmp_path / "out" / "x").read_text() == "kept"
