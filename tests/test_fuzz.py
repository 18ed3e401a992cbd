"""Untrusted bytes never crash the tool with anything but its own errors (hypothesis fuzzing).

Bounded example counts keep the suite fast; benchmarks/fuzz_inputs.py runs the same
targets with many more examples by hand.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_like.averaging.trajectory import step_of
from mergekit_like.errors import InvalidCheckpointError, MergekitLikeError
from mergekit_like.io import open_checkpoint
from mergekit_like.io.safetensors_format import parse_header
from mergekit_like.io.sidefiles import copy_side_files
from mergekit_like.merge.recipe import load_recipe, parse_recipe

# benchmarks/fuzz_inputs.py raises the count for long runs by hand.
EXAMPLES = int(os.environ.get("MERGEKIT_LIKE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
entry_fields = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "BF16", "I64", "BOOL", "F8_E4M3", "Q7", ""]) | json_values,
    "shape": st.lists(st.integers(-2, 5), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-4, 64), min_size=0, max_size=3) | json_values,
})
headers = st.dictionaries(st.text(max_size=8), entry_fields | json_values, max_size=4)


@FUZZ
@given(raw=st.binary(max_size=200), file_size=st.integers(0, 400))
def test_header_parser_on_random_bytes(raw: bytes, file_size: int) -> None:
    try:
        parse_header(raw, file_size=file_size, path="fuzz.safetensors")
    except MergekitLikeError:
        pass


@FUZZ
@given(header=headers, data=st.binary(max_size=64), declared=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_whole_files_with_structured_headers(tmp_path_factory: pytest.TempPathFactory, header: dict,
                                             data: bytes, declared: int | None) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "model.safetensors"
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if declared is None else declared) + raw + data)
    try:
        with open_checkpoint(path) as checkpoint:
            for name in checkpoint.names():
                checkpoint.read(name)
    except MergekitLikeError:
        pass


@FUZZ
@given(index=json_values, shard_bytes=st.binary(max_size=40))
def test_index_json(tmp_path_factory: pytest.TempPathFactory, index: object, shard_bytes: bytes) -> None:
    directory = tmp_path_factory.mktemp("fuzz")
    (directory / "model-00001-of-00001.safetensors").write_bytes(shard_bytes)
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        open_checkpoint(directory).close()
    except MergekitLikeError:
        pass


@FUZZ
@given(weight_map=st.dictionaries(st.text(max_size=6), st.text(max_size=30), max_size=4))
def test_index_shard_names(tmp_path_factory: pytest.TempPathFactory, weight_map: dict) -> None:
    directory = tmp_path_factory.mktemp("fuzz")
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    try:
        open_checkpoint(directory).close()
    except MergekitLikeError:
        pass


methods = st.sampled_from(["linear", "ties", "slerp", "dare_ties", "model_stock", "wise_ft", "nope"])
recipes = st.fixed_dictionaries({"merge_method": methods | json_values}, optional={
    "base_model": st.text(max_size=5) | json_values,
    "models": st.lists(st.fixed_dictionaries({"model": st.text(max_size=5) | json_values},
                                             optional={"parameters": st.dictionaries(
                                                 st.sampled_from(["weight", "density", "t", "x"]), json_values,
                                                 max_size=3)}) | json_values, max_size=3),
    "parameters": st.dictionaries(st.sampled_from(["weight", "density", "t", "lambda", "alpha", "normalize"]),
                                  json_values, max_size=3) | json_values,
    "dtype": json_values, "out_dtype": json_values, "seed": json_values, "slices": json_values,
})


@FUZZ
@given(data=recipes | json_values)
def test_recipes(data: object) -> None:
    try:
        parse_recipe(data)
    except MergekitLikeError:
        pass


# Pieces of recipe YAML, joined at random: keys, scalars YAML reads as other types, flow and
# block syntax, anchors and aliases (recursive ones too), tags, including one that would run code.
YAML_PIECES = [
    "merge_method: ", "linear", "ties", "slerp", "models:", "\n", "\n  ", "- ", "- model: ", "a", "./m",
    "base_model: ", "parameters:", " weight: ", " density: ", "t: ", "dtype: ", "bfloat16", "slices:",
    "1", "-1", "0.5", "1e400", "-.inf", ".nan", "0x1F", "0o17", "2020-01-01", "~", "null", "yes", "[", "]",
    "{", "}", ", ", ": ", "? ", "&a ", "*a", "<<: *a", "!!binary ", "!!set ", "!!str ", "!!map ", "!!seq ",
    "!!omap ", "!!pairs ", "!!null ", "!!int ", "!!float ", "!!bool ", "!!timestamp ", "!!python/object/apply:os.system [touch pwned]", "|", ">", "'", '"',
    "#", "---", "...", "%YAML 1.1", "\t",
]
recipe_texts = (
    st.lists(st.sampled_from(YAML_PIECES), max_size=40).map("".join)
    | recipes.map(lambda r: yaml.safe_dump(r, allow_unicode=True))
    | st.text(max_size=400)
)


@FUZZ
@given(content=recipe_texts.map(lambda t: t.encode("utf-8", "surrogatepass")) | st.binary(max_size=1000))
def test_recipe_files(tmp_path_factory: pytest.TempPathFactory, content: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yml"
    path.write_bytes(content)
    try:
        load_recipe(path)
    except MergekitLikeError:
        pass
    assert not (Path.cwd() / "pwned").exists()


@FUZZ
@given(content=st.binary(max_size=1000) | json_values.map(lambda v: json.dumps(v).encode()))
def test_trainer_state(tmp_path_factory: pytest.TempPathFactory, content: bytes) -> None:
    directory = tmp_path_factory.mktemp("fuzz") / "checkpoint-7"
    directory.mkdir()
    (directory / "trainer_state.json").write_bytes(content)
    try:
        step_of(directory)
    except MergekitLikeError:
        pass


@FUZZ
@given(content=st.binary(max_size=1000) | json_values.map(lambda v: json.dumps(v).encode()))
def test_config_json_is_copied_or_passed_through(tmp_path_factory: pytest.TempPathFactory, content: bytes) -> None:
    source = tmp_path_factory.mktemp("src")
    (source / "config.json").write_bytes(content)
    destination = tmp_path_factory.mktemp("dst")
    assert copy_side_files(source, destination, torch.bfloat16) == ["config.json"]
    assert (destination / "config.json").exists()


RECIPE_CRASHERS = [
    {"merge_method": []},
]


@pytest.mark.parametrize("data", RECIPE_CRASHERS)
def test_recipe_regressions_found_by_fuzzing(data: object) -> None:
    with pytest.raises(MergekitLikeError):
        parse_recipe(data)


RECIPE_TEXT_CRASHERS = [
    pytest.param(b"[" * 2_000, id="nested-too-deeply"),
    pytest.param(b"merge_method: linear\nmodels: " + b"- " * 3000 + b"x", id="nested-block-sequences"),
    *(pytest.param(text, id=text.decode()[:14]) for text in (
        b"!!int ~", b"!!int ", b"!!float ---", b"!!float ", b"!!bool x", b"!!timestamp x",
        b"!!timestamp 2020-13-45",
    )),
    pytest.param(b"merge_method: " + b"1" * 5000, id="huge-integer"),
]


@pytest.mark.parametrize("content", RECIPE_TEXT_CRASHERS)
def test_recipe_file_regressions(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "recipe.yml").write_bytes(content)
    with pytest.raises(MergekitLikeError, match=r"recipe\.yml"):
        load_recipe(tmp_path / "recipe.yml")


@pytest.mark.parametrize("content", [
    pytest.param(b"[" * 100_000, id="nested-too-deeply"),
    pytest.param(b'{"global_step": ' + b"1" * 5000 + b"}", id="huge-integer"),
])
def test_trainer_state_regressions(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "checkpoint-7").mkdir()
    (tmp_path / "checkpoint-7" / "trainer_state.json").write_bytes(content)
    with pytest.raises(MergekitLikeError, match=r"trainer_state\.json"):
        step_of(tmp_path / "checkpoint-7")


def test_config_regression_nested_too_deeply_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_bytes(b"[" * 100_000)
    (tmp_path / "dst").mkdir()
    with pytest.raises(InvalidCheckpointError, match=r"src/config\.json: config is nested too deeply"):
        copy_side_files(tmp_path / "src", tmp_path / "dst", torch.bfloat16)


def test_config_regression_integer_past_the_digit_limit_is_copied_unchanged(tmp_path: Path) -> None:
    content = b'{"vocab_size": ' + b"1" * 5000 + b"}"  # valid JSON that json.loads refuses
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_bytes(content)
    (tmp_path / "dst").mkdir()
    assert copy_side_files(tmp_path / "src", tmp_path / "dst", torch.bfloat16) == ["config.json"]
    assert (tmp_path / "dst" / "config.json").read_bytes() == content


def test_regressions_found_by_fuzzing(tmp_path: Path) -> None:
    """Inputs the fuzzers found crashing, kept as regression tests."""
    cases = [
        b'{"w": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}',
        b'{"__metadata__": [], "w": 1}',
        b'[' * 100_000,
    ]
    for raw in cases:
        with pytest.raises(MergekitLikeError):
            parse_header(raw, file_size=8 + len(raw), path=tmp_path / "x.safetensors")
