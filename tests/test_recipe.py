"""Recipes: mergekit's YAML form, the quick CLI form, and every problem reported at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from mergekit_like.card import RECIPE_FILE, pinned_ref, recipe_text, resolved_recipe
from mergekit_like.errors import RecipeError
from mergekit_like.merge.recipe import MergeRecipe, dump_recipe, load_recipe, parse_recipe, recipe_from_cli
from mergekit_like.methods import BaseUse, all_methods


def ties_recipe(**changes) -> dict:
    data = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": "b", "parameters": {"weight": 0.5, "density": 0.5}}],
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
    }
    data.update(changes)
    return data


def problems_of(data: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    return info.value.problems


def test_mergekit_form_parses_with_dtype_as_compute_and_output_dtype() -> None:
    recipe = parse_recipe(ties_recipe(out_dtype="float16"))
    assert recipe.compute_dtype == torch.bfloat16 and recipe.out_dtype == torch.float16
    assert not recipe.dtype_sets_output and [m.model for m in recipe.inputs] == ["a", "b"]  # out_dtype decides


def test_unknown_method_lists_the_known_ones() -> None:
    (problem,) = problems_of(ties_recipe(merge_method="tie"))
    assert "unknown merge_method 'tie'" in problem and "ties" in problem


def test_missing_weight_names_the_model() -> None:
    data = ties_recipe(models=[{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b"}])
    (problem,) = problems_of(data)
    assert "needs 'weight' for every model; missing for b" in problem


def test_slerp_with_three_models_is_refused() -> None:
    data = {"merge_method": "slerp", "base_model": "a", "models": ["a", "b", "c"], "parameters": {"t": 0.5}}
    (problem,) = problems_of(data)
    assert "slerp needs exactly two models" in problem and "got 3" in problem


def test_unknown_keys_are_errors_not_ignored() -> None:
    problems = problems_of(ties_recipe(tokenizer={"source": "union", "pad": 8}, foo=1))
    assert any("tokenizer: unknown key 'pad'" in p for p in problems)
    assert any("unknown key 'foo'" in p for p in problems)


def test_every_problem_is_reported_at_once() -> None:
    data = ties_recipe(
        parameters={"normalize": "maybe", "lambda": float("nan"), "bogus": 1},
        models=[{"model": "a", "parameters": {"weight": 1.0, "density": -0.1}},
                {"model": "a", "parameters": {"weight": 1.0, "t": 0.3}}],
        dtype="float13",
    )
    problems = problems_of(data)
    joined = "\n".join(problems)
    for expected in ("'maybe' is not true or false", "nan is not a finite number", "unknown parameter 'bogus'",
                     "-0.1 is outside [0, 1]", "'a' is listed twice", "unknown parameter 't'",
                     "unknown dtype name 'float13'"):
        assert expected in joined, expected
    assert len(problems) >= 7


def test_shared_parameter_set_per_model_is_an_error() -> None:
    data = ties_recipe()
    data["models"][0]["parameters"]["lambda"] = 0.5
    (problem,) = problems_of(data)
    assert "'lambda' is shared by all models" in problem


def test_linear_with_an_unlisted_base_model_explains_itself() -> None:
    data = {"merge_method": "linear", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 1}}]}
    (problem,) = problems_of(data)
    assert "linear does not use base_model" in problem


def test_bad_filter_and_gradient_forms() -> None:
    data = ties_recipe(parameters={"lambda": [{"filter": "mlp"}], "normalize": []})
    problems = "\n".join(problems_of(data))
    assert "filter entry has no 'value'" in problems and "empty list" in problems


def test_quick_form_spreads_comma_values_over_models() -> None:
    recipe = recipe_from_cli("ties", ["a", "b"], base="base", params=["density=0.2", "weight=0.7,0.3"])
    assert recipe.base_model == "base" and recipe.compute_dtype == torch.float32
    assert [dict(m.parameters) for m in recipe.inputs] == [{"weight": 0.7}, {"weight": 0.3}]
    assert recipe.parameters == {"density": 0.2}


def test_quick_form_value_count_must_match_models() -> None:
    with pytest.raises(RecipeError, match="3 values for 2 models"):
        recipe_from_cli("linear", ["a", "b"], params=["weight=1,2,3"])


def test_quick_form_accepts_yaml_gradients_and_sweeps() -> None:
    recipe = recipe_from_cli("slerp", ["a", "b"], base="a", params=["t=[0, 0.5, 1]"])
    assert recipe.parameters["t"] == [0, 0.5, 1]
    sweep = recipe_from_cli("wise_ft", ["ft"], base="zs", params=["alpha=0.25,0.5"])
    assert sweep.sweep_values == [0.25, 0.5]


def test_dumped_recipe_loads_back_identically(tmp_path: Path) -> None:
    recipe = parse_recipe(ties_recipe(seed=7))
    path = tmp_path / "r.yml"
    path.write_text(dump_recipe(recipe, extra={"written by": "test"}))
    assert load_recipe(path) == recipe


def test_recipe_file_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: [unclosed")
    with pytest.raises(RecipeError, match=r"bad\.yml: not valid YAML"):
        load_recipe(bad)


def test_negative_weights_warn_outside_task_arithmetic(caplog: pytest.LogCaptureFixture) -> None:
    data = ties_recipe()
    data["models"][0]["parameters"]["weight"] = -1.0
    parse_recipe(data)  # mergekit accepts them, so shared recipes keep working
    assert "weight -1.0 is negative" in caplog.text
    negation = {"merge_method": "task_arithmetic", "base_model": "base",
                "models": [{"model": "a", "parameters": {"weight": -1.0}}]}
    assert parse_recipe(negation).inputs[0].parameters["weight"] == -1.0


# Every parameter mergekit 0.1.5 accepts for each method, with a value other than the default
# (merge_methods/registry.py and generalized_task_arithmetic.py: the task-arithmetic family
# shares int8_mask, normalize, rescale, lambda, weight and density; breadcrumbs adds gamma).
_FAMILY = ({"int8_mask": True, "normalize": True, "rescale": True, "lambda": 0.5}, {"weight": 0.7, "density": 0.5})
_CRUMBS = (_FAMILY[0], {**_FAMILY[1], "gamma": 0.02})
MERGEKIT_PARAMETERS = {
    "task_arithmetic": _FAMILY,
    "ties": _FAMILY,
    "dare_linear": _FAMILY,
    "dare_ties": _FAMILY,
    "breadcrumbs": _CRUMBS,
    "breadcrumbs_ties": _CRUMBS,
    "linear": ({"normalize": False}, {"weight": 0.7}),
    "slerp": ({"t": 0.3}, {}),
    "model_stock": ({"filter_wise": True}, {}),
}


@pytest.mark.parametrize("method", sorted(MERGEKIT_PARAMETERS))
def test_every_parameter_mergekit_accepts_parses(method: str) -> None:
    global_params, per_model = MERGEKIT_PARAMETERS[method]
    others = ["a"] if method == "slerp" else ["a", "b"]
    data = {
        "merge_method": method,
        "models": [{"model": m, "parameters": dict(per_model)} for m in others],
        "parameters": dict(global_params),
    }
    if method == "linear":
        data["base_model"] = "a"  # linear takes no base; a listed one is merged as a model
    else:
        data["base_model"] = "base"
        data["models"].append({"model": "base"})
    recipe = parse_recipe(data)
    assert dict(recipe.parameters) == global_params
    assert all(dict(m.parameters) == per_model for m in recipe.models if m.model != "base")


def test_ignored_parameters_are_checked_as_mergekit_checks_them() -> None:
    data = {"merge_method": "task_arithmetic", "base_model": "base",
            "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 1.5, "int8_mask": True}}],
            "parameters": {"int8_mask": "maybe", "rescale": 2}}
    problems = problems_of(data)
    assert any("parameters: int8_mask: 'maybe' is not true or false" in p for p in problems)
    assert any("rescale: 2 is not true or false" in p for p in problems)
    assert any("density: 1.5 is outside [0, 1]" in p for p in problems)
    assert any("'int8_mask' is shared by all models" in p for p in problems)
    assert len(problems) == 4


def test_parameters_that_would_change_numbers_stay_errors() -> None:
    # DELLA's epsilon and breadcrumbs' gamma change mergekit's numbers; ties implements neither.
    problems = problems_of(ties_recipe(parameters={"epsilon": 0.1, "gamma": 0.01}))
    assert any("unknown parameter 'epsilon' for ties" in p for p in problems)
    assert any("unknown parameter 'gamma' for ties" in p for p in problems)
    (problem,) = problems_of({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}],
                              "parameters": {"int8_mask": True}})
    assert "unknown parameter 'int8_mask' for linear" in problem


def test_with_defaults_writes_every_method_parameter_and_keeps_given_values() -> None:
    recipe = parse_recipe(ties_recipe()).with_defaults()
    assert dict(recipe.parameters) == {
        "normalize": True, "density": 1.0, "rescale": False, "lambda": 1.0, "consensus": "sum",
        "trim_scope": "tensor", "trim_ties": "sort",
    }
    assert recipe.models[0].parameters["density"] == 0.5  # per-model values still win
    assert recipe.with_defaults() == recipe


def test_resolved_recipe_has_absolute_paths_and_pinned_hub_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    sha = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "cache" / "models--org--ft" / "snapshots" / sha
    data = {"merge_method": "task_arithmetic", "base_model": "models/base", "tokenizer_source": "org/ft",
            "models": [{"model": "org/ft", "parameters": {"weight": 1.0}}, {"model": "org/other@main"}],
            "parameters": {"weight": 0.5}}
    recipe = resolved_recipe(parse_recipe(data), paths={"org/ft": snapshot, "models/base": Path("models/base")})
    assert recipe.base_model == str(tmp_path / "models" / "base")
    assert [m.model for m in recipe.models] == [f"org/ft@{sha}", "org/other@main"]  # no commit known: kept
    assert recipe.tokenizer is not None and recipe.tokenizer.source == f"org/ft@{sha}"
    assert recipe.parameters == {"weight": 0.5, "normalize": False, "lambda": 1.0}
    assert pinned_ref("org/ft") == "org/ft"
    (tmp_path / RECIPE_FILE).write_text(recipe_text(parse_recipe(data), paths={"org/ft": snapshot}))
    assert load_recipe(tmp_path / RECIPE_FILE) == recipe


def test_compute_dtype_override_keeps_the_output_dtype_that_dtype_set() -> None:
    recipe = parse_recipe(ties_recipe()).with_compute_dtype(torch.float32)
    assert recipe.compute_dtype == torch.float32 and recipe.out_dtype == torch.bfloat16
    assert not recipe.dtype_sets_output
    explicit = parse_recipe(ties_recipe(out_dtype="float16")).with_compute_dtype(torch.float32)
    assert explicit.out_dtype == torch.float16
    data = ties_recipe()
    del data["dtype"]
    without = parse_recipe(data).with_compute_dtype(torch.float64)
    assert without.compute_dtype == torch.float64 and without.out_dtype is None
    assert parse_recipe(recipe.to_dict()) == recipe  # and it survives the written recipe


def test_a_recipe_nested_too_deeply_is_a_recipe_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.yml"
    path.write_text("[" * 100_000)
    with pytest.raises(RecipeError, match="nested too deeply"):
        load_recipe(path)


@pytest.mark.parametrize("override", [{"seed": -5}, {"seed": True}, {"vocab_mismatch": "rows"},
                                      {"merge_method": "nope"}, {"parameters": {"density": 1.5}}])
def test_every_override_goes_through_the_one_validation(override: dict) -> None:
    recipe = parse_recipe(ties_recipe())
    with pytest.raises(RecipeError) as raised:
        dataclasses.replace(recipe, **override)
    assert len(raised.value.problems) == 1


def test_a_negative_seed_is_refused_by_the_parser_with_the_same_line() -> None:
    with pytest.raises(RecipeError) as parsed:
        parse_recipe({**ties_recipe(), "seed": -5})
    with pytest.raises(RecipeError) as replaced:
        dataclasses.replace(parse_recipe(ties_recipe()), seed=-5)
    assert parsed.value.problems == replaced.value.problems == ["seed must be a non-negative integer, not -5"]


def _minimal_recipe(name: str) -> MergeRecipe:
    method = all_methods()[name]
    count = method.min_models if method.max_models == 1 else max(method.min_models, 2)
    models = [f"models/m{i}" for i in range(count)]
    base = "models/base" if method.base is not BaseUse.NONE else None
    required = [f"{key}=0.5" for key, spec in method.params.items() if spec.required and not spec.per_model]
    required += [f"{key}={','.join(['0.5'] * count)}" for key, spec in method.params.items()
                 if spec.required and spec.per_model]
    return recipe_from_cli(name, [*models, *([base] if base else [])], base=base, params=required)


@pytest.mark.parametrize("name", sorted(all_methods()))
def test_every_written_recipe_is_accepted_and_reads_back_the_same(name: str, tmp_path: Path) -> None:
    recipe = _minimal_recipe(name)
    written = recipe_text(recipe)
    reread = parse_recipe(yaml.safe_load(written))
    assert reread == resolved_recipe(recipe)
    assert recipe_text(reread) == written  # a rerun writes the same recipe again


def test_an_unusual_value_is_warned_about_once_however_often_the_recipe_is_copied(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recipe = recipe_from_cli("linear", ["a", "b"], params=["weight=-0.5,1.5"])
    dataclasses.replace(recipe, seed=3).with_defaults().with_refs({"a": "/elsewhere/a"})
    recipe_text(recipe)
    assert caplog.text.count("weight -0.5 is negative") == 1
