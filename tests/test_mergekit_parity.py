"""mergekit recipes give mergekit's numbers: its own outputs, bit for bit.

tests/data/mergekit_golden holds tiny models, the recipes and mergekit 0.1.5's
outputs (see its README). Each recipe runs through this tool's recipe parser,
planner and engine, and every output tensor must equal mergekit's exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_like.errors import RecipeError
from mergekit_like.merge.engine import planned_merge, run_merge
from mergekit_like.merge.recipe import parse_recipe

GOLDEN = Path(__file__).parent / "data" / "mergekit_golden"
ORIGINAL_PREFIX = "/tmp/mkref/golden/models"
CASES = sorted(p.name for p in (GOLDEN / "cases").iterdir() if (p / "expected.safetensors").exists()
               and p.name != "linear_zero_weight_sum")


def local_recipe(case: str) -> dict:
    text = (GOLDEN / "cases" / case / "recipe.yml").read_text()
    return yaml.safe_load(text.replace(ORIGINAL_PREFIX, str(GOLDEN / "models")))


@pytest.mark.parametrize("case", CASES)
def test_recipe_matches_mergekit_bit_for_bit(case: str, tmp_path: Path) -> None:
    recipe = parse_recipe(local_recipe(case))
    with planned_merge(recipe) as plan:
        run_merge(plan, tmp_path / "out")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    theirs = load_file(GOLDEN / "cases" / case / "expected.safetensors")
    assert set(ours) == set(theirs)
    mismatched = [n for n in theirs if ours[n].dtype != theirs[n].dtype or not torch.equal(ours[n], theirs[n])]
    assert not mismatched, f"{len(mismatched)} tensors differ from mergekit, e.g. {mismatched[:3]}"


def test_zero_weight_sum_is_an_error_naming_the_tensor_not_infinities() -> None:
    recipe = parse_recipe(local_recipe("linear_zero_weight_sum"))
    with pytest.raises(RecipeError, match=r"tensor 'model\.[^']+': the weights sum to zero"):
        with planned_merge(recipe):
            pass
