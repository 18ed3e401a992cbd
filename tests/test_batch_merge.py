"""Candidates merged together in one read pass write exactly what each merged alone writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_checkpoint
from safetensors.torch import load_file

from mergekit_like.errors import MergeError
from mergekit_like.merge.batch import batched_plan
from mergekit_like.merge.engine import MergeOptions, planned_merge, run_merge
from mergekit_like.merge.recipe import parse_recipe
from mergekit_like.search.trial import merge_and_score


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batch")
    g = torch.Generator().manual_seed(1)
    names = [f"model.layers.{i}.mlp.weight" for i in range(2)] + ["model.embed_tokens.weight"]
    base = {n: torch.randn(16, 12, generator=g) for n in names}
    config = {"model_type": "llama", "num_hidden_layers": 2, "architectures": ["LlamaForCausalLM"]}
    write_checkpoint(root / "base", base, config=config)
    for i in range(3):
        write_checkpoint(root / f"ft{i}", {n: v + torch.randn(v.shape, generator=g) for n, v in base.items()},
                         config=config)
    return root


def recipe(models: Path, method: str, weights: list[float], **params: object) -> dict:
    base = {} if method == "linear" else {"base_model": str(models / "base")}
    return {"merge_method": method, **base, "dtype": "float32", "parameters": dict(params),
            "models": [{"model": str(models / f"ft{i}"), "parameters": {"weight": w}} for i, w in enumerate(weights)]}


def alone(data: dict, out: Path) -> dict[str, torch.Tensor]:
    with planned_merge(parse_recipe(data)) as plan:
        run_merge(plan, out)
    return load_file(out / "model.safetensors")


CANDIDATES = {
    "task_arithmetic": [([0.3, 0.7, 0.5], {}), ([1.0, 0.0, 0.2], {"lambda": 0.8}), ([0.1, 0.1, 0.9], {})],
    "linear": [([0.3, 0.7, 0.5], {}), ([1.0, 2.0, 0.5], {"normalize": False})],
    "ties": [([1.0, 1.0, 1.0], {"density": 0.3}), ([0.5, 1.0, 0.2], {"density": 0.8})],
    "dare_ties": [([1.0, 1.0, 1.0], {"density": 0.5}), ([0.5, 1.0, 0.2], {"density": 0.9})],
}


@pytest.mark.parametrize("method", sorted(CANDIDATES))
def test_a_batch_writes_each_candidate_bit_for_bit(models: Path, tmp_path: Path, method: str) -> None:
    datas = [recipe(models, method, w, **p) for w, p in CANDIDATES[method]]
    labels = [f"c{i}" for i in range(len(datas))]
    plans = [planned_merge(parse_recipe(d)).__enter__() for d in datas]
    try:
        run_merge(batched_plan(plans, labels), tmp_path / "batch")
    finally:
        for plan in plans:
            plan.close()
    for i, data in enumerate(datas):
        together = load_file(tmp_path / "batch" / labels[i] / "model.safetensors")
        expected = alone(data, tmp_path / f"alone{i}")
        assert together.keys() == expected.keys()
        assert all(torch.equal(together[k], expected[k]) for k in expected), (method, i)


def test_a_layered_recipe_batches_too(models: Path, tmp_path: Path) -> None:
    def sliced(t: float) -> dict:
        return {"merge_method": "slerp", "base_model": str(models / "base"), "dtype": "float32",
                "parameters": {"t": t}, "slices": [{"sources": [
                    {"model": str(models / "base"), "layer_range": [0, 2]},
                    {"model": str(models / "ft0"), "layer_range": [0, 2]}]}]}

    outcomes = merge_and_score([sliced(0.2), sliced(0.6)], lambda p: float(
        load_file(p / "model.safetensors")["model.layers.1.mlp.weight"].sum()), tmp_path)
    expected = [float(alone(sliced(t), tmp_path / f"s{t}")["model.layers.1.mlp.weight"].sum()) for t in (0.2, 0.6)]
    assert [o.score for o in outcomes] == expected
    assert list(tmp_path.glob("trial-*")) == []  # every candidate removed once scored


def test_candidates_that_cannot_share_a_pass_are_refused_in_one_line(models: Path) -> None:
    whole = recipe(models, "ties", [1.0, 1.0, 1.0], density=0.5, trim_scope="model")
    other = recipe(models, "ties", [1.0, 1.0, 1.0], density=0.2, trim_scope="model")
    two = recipe(models, "task_arithmetic", [1.0, 1.0, 1.0])
    two["models"] = two["models"][:2]
    for pair, why in [((whole, other), "whole-model pre-pass"),
                      ((recipe(models, "task_arithmetic", [1.0, 1.0, 1.0]), two), "merged differently")]:
        plans = [planned_merge(parse_recipe(d), MergeOptions()).__enter__() for d in pair]
        try:
            with pytest.raises(MergeError, match=why) as refused:
                batched_plan(plans, ["a", "b"])
            assert "--batch 1" in str(refused.value)
        finally:
            for plan in plans:
                plan.close()


def test_a_batch_that_cannot_merge_together_merges_each_candidate_alone(models: Path, tmp_path: Path) -> None:
    whole = [recipe(models, "ties", [1.0, 1.0, 1.0], density=d, trim_scope="model") for d in (0.3, 0.6)]
    broken = recipe(models, "task_arithmetic", [1.0, 1.0, 1.0])
    broken["models"][0]["model"] = str(models / "missing")

    def total(path: Path) -> float:
        return float(load_file(path / "model.safetensors")["model.layers.0.mlp.weight"].sum())

    outcomes = merge_and_score([*whole, broken], total, tmp_path, numbers=[4, 5, 6])
    expected = [total_of(alone(d, tmp_path / f"alone{i}")) for i, d in enumerate(whole)]
    assert [o.score for o in outcomes[:2]] == expected  # the pre-pass candidates merged alone, exactly
    assert outcomes[2].score is None and "missing" in (outcomes[2].error or "")  # only the bad one failed


def total_of(tensors: dict[str, torch.Tensor]) -> float:
    return float(tensors["model.layers.0.mlp.weight"].sum())
