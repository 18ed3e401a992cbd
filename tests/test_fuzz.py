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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_like.averaging.trajectory import step_of
from mergekit_like.errors import MergekitLikeError
from mergekit_like.io import open_checkpoint
from mergekit_like.io.safetensors_format import parse_header
from mergekit_like.io.sidefiles import copy_side_files
from mergekit_like.recipe import parse_recipe

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


@FUZZ
@given(content=st.binary(max_size=80) | json_values.map(lambda v: json.dumps(v).encode()))
def test_trainer_state(tmp_path_factory: pytest.TempPathFactory, content: bytes) -> None:
    directory = tmp_path_factory.mktemp("fuzz") / "checkpoint-7"
    directory.mkdir()
    (directory / "trainer_state.json").write_bytes(content)
    try:
        step_of(directory)
    except MergekitLikeError:
        pass


@FUZZ
@given(content=st.binary(max_size=80) | json_values.map(lambda v: json.dumps(v).encode()))
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
