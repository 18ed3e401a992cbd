"""Mixture-of-experts checkpoints are merged in transformers 5's fused layout, as mergekit merges them.

tests/data/mergekit_moe holds three tiny Mixtral models in the per-expert layout the
Hub's checkpoints store, recipes, and mergekit 0.1.5's outputs (made by the script beside
them). Name filters and whole-tensor statistics (TIES, breadcrumbs, model_stock) see the
same fused tensors in both tools, so the outputs are equal bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergekit_like.io.experts import MIXTRAL, FusedExperts, resolved_expert_layout, with_expert_layout
from mergekit_like.io.reader import open_checkpoint
from mergekit_like.merge.multidoc import load_recipe_set, merge_documents
from mergekit_like.merge.recipe import parse_recipe

DATA = Path(__file__).parent / "data" / "mergekit_moe"
CASES = sorted(p.name for p in (DATA / "cases").iterdir() if (p / "expected.safetensors").exists())
MIXTRAL_CONFIG = {"model_type": "mixtral"}


@pytest.fixture(autouse=True)
def transformers_5(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` as it resolves beside transformers 5 (the goldens' layout), whatever is installed here."""
    import mergekit_like.io.experts as experts

    monkeypatch.setattr(experts, "_transformers_major", lambda: 5)


@pytest.mark.parametrize("case", CASES)
def test_moe_recipes_match_mergekit_bit_for_bit(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(DATA)
    merge_documents(load_recipe_set(DATA / "cases" / case / "recipe.yml"), tmp_path / "out")
    ours, theirs = load_file(tmp_path / "out" / "model.safetensors"), load_file(DATA / "cases" / case /
                                                                                  "expected.safetensors")
    assert set(ours) == set(theirs)
    assert [n for n in theirs if not torch.equal(ours[n], theirs[n])] == []


def test_the_fused_view_stacks_experts_and_joins_gate_and_up() -> None:
    stored = load_file(DATA / "models" / "base" / "model.safetensors")
    with open_checkpoint(DATA / "models" / "base") as inner:
        view = with_expert_layout(inner, MIXTRAL_CONFIG, "fused")
        assert isinstance(view, FusedExperts)
        names = view.names()
        assert "model.layers.1.mlp.experts.gate_up_proj" in names and "model.layers.1.mlp.gate.weight" in names
        assert not any("block_sparse_moe" in n for n in names)
        prefix = "model.layers.1.block_sparse_moe.experts"
        gate_up = torch.stack([torch.cat([stored[f"{prefix}.{e}.w1.weight"], stored[f"{prefix}.{e}.w3.weight"]])
                               for e in range(3)])
        assert view.entry("model.layers.1.mlp.experts.gate_up_proj").shape == tuple(gate_up.shape)
        assert torch.equal(view.read("model.layers.1.mlp.experts.gate_up_proj"), gate_up)
        entry = view.entry("model.layers.1.mlp.experts.down_proj")
        buffer = torch.empty(entry.row_bytes * 2, dtype=torch.uint8)  # a staging buffer, as the GPU path reads
        rows = view.read("model.layers.1.mlp.experts.down_proj", rows=(1, 3), out=buffer)
        assert torch.equal(rows, torch.stack([stored[f"{prefix}.{e}.w2.weight"] for e in (1, 2)]))
        assert torch.equal(view.read("model.layers.1.mlp.gate.weight"), stored["model.layers.1.block_sparse_moe.gate.weight"])
        view.prefetch("model.layers.1.mlp.experts.gate_up_proj", (0, 1))
        assert view.stored_name("model.layers.1.mlp.gate.weight") == "model.layers.1.block_sparse_moe.gate.weight"


def test_stored_layout_keeps_one_tensor_per_expert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(DATA)
    data = {"merge_method": "linear", "models": [{"model": "./models/ft1", "parameters": {"weight": 0.5}},
                                                 {"model": "./models/ft2", "parameters": {"weight": 0.5}}],
            "dtype": "float32", "mergekit_like": {"expert_layout": "stored"}}
    from mergekit_like.merge.engine import planned_merge, run_merge

    with planned_merge(parse_recipe(data)) as plan:
        run_merge(plan, tmp_path / "out")
    names = set(load_file(tmp_path / "out" / "model.safetensors"))
    assert names == set(load_file(DATA / "models" / "ft1" / "model.safetensors"))
    assert resolved_expert_layout("stored") == "stored"
    with open_checkpoint(DATA / "models" / "base") as inner:
        assert with_expert_layout(inner, {"model_type": "llama"}, "fused") is inner  # no experts to fuse


def test_the_layout_is_recorded_in_the_written_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.chdir(DATA)
    result = CliRunner().invoke(app, ["merge", str(DATA / "cases" / "ties" / "recipe.yml"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    written = load_recipe_set(tmp_path / "out" / "merge_recipe.yml").final.recipe
    assert written.expert_layout == resolved_expert_layout("auto") == "fused"  # transformers 5 or none here


def test_a_bad_layout_is_refused() -> None:
    from mergekit_like.errors import RecipeError

    with pytest.raises(RecipeError, match="expert_layout must be one of auto, fused, stored"):
        parse_recipe({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}],
                      "mergekit_like": {"expert_layout": "split"}})


@pytest.mark.integration
def test_the_fused_output_loads_in_transformers_with_the_stored_models_logits(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 loads only the stored layout")
    monkeypatch.chdir(DATA)
    data = {"merge_method": "linear", "models": [{"model": "./models/ft1", "parameters": {"weight": 1.0}}],
            "dtype": "float32"}
    from mergekit_like.merge.engine import planned_merge, run_merge

    with planned_merge(parse_recipe(data)) as plan:
        run_merge(plan, tmp_path / "out")
    ids = torch.tensor([[1, 5, 9, 3, 30]])
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        stored = transformers.AutoModelForCausalLM.from_pretrained(DATA / "models" / "ft1")  # converted on loading
        assert torch.equal(merged(ids).logits, stored(ids).logits)


def test_a_pickled_moe_checkpoint_is_fused_too(tmp_path: Path) -> None:
    import json
    import shutil

    stored = load_file(DATA / "models" / "ft2" / "model.safetensors")
    (tmp_path / "ft2").mkdir()
    torch.save(stored, tmp_path / "ft2" / "pytorch_model.bin")
    shutil.copyfile(DATA / "models" / "ft2" / "config.json", tmp_path / "ft2" / "config.json")
    with open_checkpoint(tmp_path / "ft2", allow_pickle=True) as pickled, open_checkpoint(DATA / "models" / "ft2") as st:
        config = json.loads((DATA / "models" / "ft2" / "config.json").read_text())
        a, b = with_expert_layout(pickled, config, "fused"), with_expert_layout(st, config, "fused")
        assert a.names() == b.names()
        name = "model.layers.0.mlp.experts.gate_up_proj"
        assert torch.equal(a.read(name), b.read(name))
