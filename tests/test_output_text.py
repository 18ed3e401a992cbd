"""What the tool writes as text beside the weights stays well-formed whatever its inputs hold."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import write_checkpoint

from mergekit_like.card import merge_card
from mergekit_like.io.sidefiles import copy_side_files
from mergekit_like.merge.recipe import recipe_from_cli


def test_a_newline_in_an_input_path_cannot_add_a_heading_to_the_card() -> None:
    recipe = recipe_from_cli("linear", ["models/a\n# Injected", "models/b"], params=["weight=1,1"])
    card = merge_card(recipe, title="out\n## Title", has_config=False)
    body = card.split("\n---\n", 1)[1]
    headings = [line for line in body.splitlines() if line.startswith("#")]
    assert headings == ["# out\\n## Title", "## Inputs", "## Recipe"]
    assert "`models/a\\n# Injected` (local)" in body


def test_nan_and_infinity_in_a_config_are_written_as_standard_json(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = write_checkpoint(tmp_path / "src", {"w": torch.ones(2)})
    (source / "config.json").write_text('{"model_type": "llama", "rope": {"factor": NaN}, "eps": [Infinity, 1]}')
    with caplog.at_level(logging.WARNING):
        copy_side_files(source, tmp_path, torch.bfloat16)
    text = (tmp_path / "config.json").read_text()
    written = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))
    assert written["rope"] == {"factor": None} and written["eps"] == [None, 1]
    assert "rope.factor is nan" in caplog.text and "eps[0] is inf" in caplog.text
