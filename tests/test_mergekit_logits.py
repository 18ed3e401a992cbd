"""Merged outputs load in transformers and give the logits of mergekit's outputs (skipped without it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from mergekit_like.merge.multidoc import load_recipe_set, merge_documents  # noqa: E402
from tests.test_mergekit_parity import GOLDEN, local_recipe_file  # noqa: E402

pytestmark = pytest.mark.integration

# A frankenmerge (layers restacked), a slices merge, a multi-document recipe and new methods.
CASES = ["slices_passthrough_two_models", "slices_gradient_slerp", "multi_doc_ties_of_merges", "karcher_default",
         "nuslerp_base", "sce_topk_0_5", "arcee_fusion"]


def mergekit_output(case: str, reference: Path, directory: Path) -> Path:
    """mergekit's stored output as a loadable model: its tensors, beside its config (or ours)."""
    from safetensors.torch import load_file

    directory.mkdir()
    save_file(load_file(GOLDEN / "cases" / case / "expected.safetensors"), directory / "model.safetensors")
    expected_config = GOLDEN / "cases" / case / "expected_config.json"
    config = json.loads((reference / "config.json").read_text())
    if expected_config.exists():
        config |= {k: v for k, v in json.loads(expected_config.read_text()).items() if k == "num_hidden_layers"}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("case", CASES)
def test_merged_model_gives_mergekit_logits(case: str, tmp_path: Path) -> None:
    out = tmp_path / "ours"
    merge_documents(load_recipe_set(local_recipe_file(case, tmp_path)), out)
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        mergekit_output(case, out, tmp_path / "theirs"), torch_dtype=torch.float32)
    assert ours.config.num_hidden_layers == theirs.config.num_hidden_layers
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        logits = ours(ids).logits
        expected = theirs(ids).logits
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, expected)
