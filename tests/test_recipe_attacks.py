"""Hostile recipes and -p values: alias bombs, duplicate keys, malformed or huge values.

Each case must end in one short RecipeError line, fast. The alias bombs run in a child
process with a deadline, so a regression fails the test instead of hanging the run.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from mergekit_like.cli.main import app
from typer.testing import CliRunner

from mergekit_like.errors import SHORT_CHARS, RecipeError, short_repr
from mergekit_like.merge.recipe import MAX_RECIPE_VALUES, load_recipe, parse_recipe, recipe_from_cli

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
# Seconds the call under test may take (it takes well under one), and the child's imports.
DEADLINE_S = 5
IMPORT_TIMEOUT_S = 120
# Longest problem line we accept: the fixed wording plus one cut value.
MAX_LINE = 300
MODELS = "merge_method: linear\nmodels:\n  - model: a\n  - model: b\n"


def alias_bomb(levels: int = 9) -> str:
    """A flow sequence that expands to 9**levels leaves: each level repeats the one below 9 times."""
    text = "&x0 [" + ", ".join(["1"] * 9) + "]"
    for k in range(1, levels):
        text = f"&x{k} [{text}, " + ", ".join([f"*x{k - 1}"] * 8) + "]"
    return text


def run_with_deadline(call: str, tmp_path: Path) -> dict:
    """Runs ``call`` (one Python expression) in a child, killed if it takes over DEADLINE_S; its outcome."""
    script = tmp_path / "attack.py"
    script.write_text(textwrap.dedent(f"""
        import functools, json
        from mergekit_like.errors import RecipeError
        from mergekit_like.merge.recipe import load_recipe, parse_recipe, recipe_from_cli
        print("ready", flush=True)
        try:
            {call}
            outcome = {{"accepted": True}}
        except RecipeError as exc:
            outcome = {{"error": str(exc)}}
        print(json.dumps(outcome), flush=True)
    """))
    # The child imports this checkout's package, whatever the environment has installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env) as child:
        try:
            # The deadline starts once the child has imported torch, which takes a while.
            started, _, _ = select.select([child.stdout], [], [], IMPORT_TIMEOUT_S)
            assert started and child.stdout is not None and child.stdout.readline() == "ready\n", "no start"
            try:
                out, err = child.communicate(timeout=DEADLINE_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{call[:60]}... ran past {DEADLINE_S} s")
        finally:
            child.kill()
    assert child.returncode == 0, err[-2000:]
    return json.loads(out.splitlines()[-1])


def assert_one_short_line(message: str) -> None:
    assert "\n" not in message and len(message) <= MAX_LINE, message[:500]


def test_the_alias_bomb_is_small_and_huge() -> None:
    text = alias_bomb()
    assert len(text) < 600
    # PyYAML shares aliased nodes, so loading it is cheap; walking it is not.
    assert len(yaml.safe_load(text)) == 9


def test_an_alias_bomb_recipe_file_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yml"
    path.write_text(MODELS + f"parameters:\n  weight: {alias_bomb()}\n")
    outcome = run_with_deadline(f"load_recipe({str(path)!r})", tmp_path)
    assert "error" in outcome, outcome
    message = outcome["error"]
    assert f"expands to more than {MAX_RECIPE_VALUES:,} values" in message and "aliases" in message
    assert message.startswith(f"{path}: ")
    assert_one_short_line(message)


def test_an_alias_bomb_in_a_p_value_is_refused_at_once(tmp_path: Path) -> None:
    value = f"weight=[{alias_bomb()}]"
    outcome = run_with_deadline(f"recipe_from_cli('linear', ['a', 'b'], params=[{value!r}])", tmp_path)
    assert "error" in outcome, outcome
    message = outcome["error"]
    assert message.startswith("-p weight: the value expands to more than") and "aliases" in message
    assert_one_short_line(message)


def test_shared_references_handed_to_parse_recipe_are_bounded(tmp_path: Path) -> None:
    bomb = "functools.reduce(lambda leaf, _: [leaf] * 9, range(8), [1] * 9)"  # 9**9 shared leaves
    call = f"parse_recipe({{'merge_method': 'linear', 'models': ['a', 'b'], 'parameters': {{'weight': {bomb}}}}})"
    outcome = run_with_deadline(call, tmp_path)
    assert "error" in outcome, outcome
    assert "the recipe expands to more than" in outcome["error"]


def test_a_recursive_alias_is_refused_as_too_large(tmp_path: Path) -> None:
    path = tmp_path / "loop.yml"
    path.write_text(MODELS + "parameters:\n  weight: &a [*a]\n")
    with pytest.raises(RecipeError, match="expands to more than") as raised:
        load_recipe(path)
    assert_one_short_line(str(raised.value))


def test_anchors_used_as_recipes_use_them_still_load(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yml"
    path.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: &w [0.2, 0.8]}\n"
                    "  - model: b\n    parameters: {weight: *w}\n")
    recipe = load_recipe(path)
    assert [m.parameters["weight"] for m in recipe.models] == [[0.2, 0.8], [0.2, 0.8]]
    # A gradient of many thousands of values is under the limit.
    many = parse_recipe({"merge_method": "linear", "models": ["a", "b"],
                         "parameters": {"weight": [0.5] * (MAX_RECIPE_VALUES // 2)}})
    assert len(many.parameters["weight"]) == MAX_RECIPE_VALUES // 2


def test_short_repr_cuts_long_values_and_keeps_short_ones() -> None:
    for value in (0.5, "x", [1, 2.5], {"filter": "a", "value": [1]}, (1,), None, True):
        assert short_repr(value) == repr(value)
    long = short_repr(list(range(10_000)))
    assert long.endswith("...") and len(long) == SHORT_CHARS + 3
    looped: list = []
    looped.append(looped)
    assert short_repr(looped).endswith("...")
    assert short_repr("y" * 10**6) == repr("y" * 10**6)[:SHORT_CHARS] + "..."
    assert short_repr(10**5000).startswith("<int")  # past Python's digit limit for str()


@pytest.mark.parametrize("override", [
    {"base_model": list(range(5000))},
    {"seed": "s" * 5000},
    {"vocab_mismatch": ["rows"] * 5000},
    {"merge_method": ["linear"] * 5000},
    {"dtype": "f" * 5000},
    {"k" * 5000: 1},
    {"parameters": {"weight": {f"key{i}": i for i in range(2000)}}},
    {"parameters": {"weight": [{"filter": list(range(5000)), "value": 1}]}},
    {"parameters": {"weight": [{"filter": "x", "value": 1, **{f"k{i}": 0 for i in range(2000)}}]}},
])
def test_every_message_shows_a_user_value_cut_short(override: dict) -> None:
    data = {"merge_method": "linear", "models": ["a", "b"], "parameters": {"weight": 1.0}, **override}
    with pytest.raises(RecipeError) as raised:
        parse_recipe(data)
    assert raised.value.problems
    for problem in raised.value.problems:
        assert len(problem) <= MAX_LINE, problem[:500]


@pytest.mark.parametrize(("text", "key", "line", "first"), [
    ("merge_method: ties\nmerge_method: linear\nmodels: [a, b]\n", "merge_method", 2, 1),
    ("merge_method: linear\nmodels: [a, b]\nparameters:\n  weight: 1\n  weight: 2\n", "weight", 5, 4),
    ("merge_method: linear\nmodels:\n  - model: a\n    model: c\n  - model: b\n", "model", 4, 3),
    ("merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1, weight: 2}}\n  - b\n", "weight", 3, 3),
])
def test_duplicate_keys_are_refused_with_the_key_and_its_line(
    tmp_path: Path, text: str, key: str, line: int, first: int
) -> None:
    path = tmp_path / "dup.yml"
    path.write_text(text)
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    expected = f"duplicate key '{key}' at line {line} (first at line {first}); give each key once"
    assert str(raised.value) == f"{path}: {expected}"


def test_merge_keys_may_still_override_what_they_bring(tmp_path: Path) -> None:
    path = tmp_path / "merge.yml"
    path.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: &p {weight: 1}\n"
                    "  - model: b\n    parameters:\n      <<: *p\n      weight: 3\n")
    assert [m.parameters["weight"] for m in load_recipe(path).models] == [1, 3]


def test_the_recipe_loader_stays_safe_and_leaves_yaml_alone(tmp_path: Path) -> None:
    path = tmp_path / "evil.yml"
    path.write_text(MODELS + "parameters:\n  weight: !!python/object/apply:os.system [touch pwned]\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
    assert not (Path.cwd() / "pwned").exists() and not (tmp_path / "pwned").exists()
    # Our resolver and duplicate check belong to our loader, not to PyYAML's SafeLoader.
    assert yaml.safe_load("a: 1e-3\na: 1") == {"a": 1} and yaml.safe_load("1e-3") == "1e-3"


@pytest.mark.parametrize("param", ["t=[", "weight=[1,2],1", "t={a: 1", "weight=*a,1", "t=!!int x",
                                   "t={a: 1, a: 2}"])
def test_malformed_p_values_are_one_recipe_error_line(param: str) -> None:
    method, models = ("slerp", ["a", "b"]) if param.startswith("t=") else ("linear", ["a", "b"])
    with pytest.raises(RecipeError) as raised:
        recipe_from_cli(method, models, base="a" if method == "slerp" else None, params=[param])
    message = str(raised.value)
    assert message.startswith(f"-p {param!r}: "), message
    assert "not valid YAML" in message or "duplicate key 'a'" in message, message
    assert_one_short_line(message)


def test_an_integer_too_large_for_a_float_is_not_a_finite_number(tmp_path: Path) -> None:
    huge = str(10**400)
    with pytest.raises(RecipeError) as raised:
        recipe_from_cli("linear", ["a", "b"], params=[f"weight={huge}"])
    assert str(raised.value).startswith("-p weight: 1000") and str(raised.value).endswith("is not a finite number")
    assert_one_short_line(str(raised.value))
    path = tmp_path / "huge.yml"
    path.write_text(MODELS + f"parameters:\n  weight: [0.5, {huge}]\n")
    with pytest.raises(RecipeError, match=r"parameters: weight: 1000\d+\.\.\. is not a finite number$") as raised:
        load_recipe(path)
    assert_one_short_line(str(raised.value))


@pytest.mark.parametrize(("text", "number"), [("1e-3", 1e-3), ("1E5", 1e5), (".5", 0.5), ("-2e+3", -2e3),
                                              ("1.5e2", 150.0), ("+3e0", 3.0)])
def test_exponent_floats_are_numbers_in_p_values_and_files(tmp_path: Path, text: str, number: float) -> None:
    recipe = recipe_from_cli("task_arithmetic", ["b"], base="a", params=[f"weight={text}"])
    assert recipe.parameters["weight"] == number and isinstance(recipe.parameters["weight"], float)
    path = tmp_path / "exp.yml"
    path.write_text(f"merge_method: task_arithmetic\nbase_model: a\nmodels:\n  - model: b\n"
                    f"parameters:\n  weight: [{text}, 1]\n  lambda: {text}\n")
    loaded = load_recipe(path)
    assert loaded.parameters == {"weight": [number, 1], "lambda": number}


def test_the_cli_prints_one_line_for_each_attack(tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    bomb = tmp_path / "bomb.yml"
    # 9**6 leaves: over the limit, yet small enough that a regression fails here instead of hanging.
    bomb.write_text(MODELS + f"parameters:\n  weight: {alias_bomb(6)}\n")
    dup = tmp_path / "dup.yml"
    dup.write_text("merge_method: ties\nmerge_method: linear\nmodels: [a, b]\n")
    attacks = {
        "-p 't=['": ["merge", "--method", "slerp", "--base", "a", "b", "-p", "t=[", "-o", out],
        "-p weight: the value expands": ["merge", "--method", "linear", "a", "b", "-p",
                                         f"weight=[{alias_bomb(6)}]", "-o", out],
        "expands to more than": ["merge", str(bomb), "-o", out],
        "duplicate key 'merge_method' at line 2": ["merge", str(dup), "-o", out],
        "is not a finite number": ["merge", "--method", "linear", "a", "b", "-p", f"weight={10**400}", "-o", out],
    }
    for expected, args in attacks.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (expected, result.output[-2000:])
        assert expected in result.output and "Traceback" not in result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and len(lines[0]) <= MAX_LINE + 100, result.output[:1000]


def test_a_long_value_of_the_wrong_type_is_shown_cut_short() -> None:
    from mergekit_like.merge.recipe import parse_recipe

    with pytest.raises(RecipeError) as raised:
        parse_recipe({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": "x" * 1000}},
                                                           {"model": "b", "parameters": {"weight": 1.0}}]})
    assert len(str(raised.value)) < 300 and "..." in str(raised.value)
