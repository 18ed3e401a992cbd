"""The streaming merge engine: planning checks, copying, sweeps, model-wide TIES, outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import split_merge_kwargs, write_checkpoint

from mergekit_like.errors import IncompatibleModelsError, OptionsError, RecipeError
from mergekit_like.io import open_checkpoint
from mergekit_like.io.reader import Checkpoint
from mergekit_like.merge.engine import MergeOptions, plan_merge, planned_merge, run_merge
from mergekit_like.merge.recipe import parse_recipe, recipe_from_cli


def merge(recipe, out: Path, **kwargs) -> Path:
    options, run = split_merge_kwargs(kwargs)
    with planned_merge(recipe, options) as plan:
        run_merge(plan, out, **run)
    return out


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {n: ckpt.read(n) for n in ckpt.names()}


@pytest.fixture
def three(tmp_path: Path) -> list[Path]:
    g = torch.Generator().manual_seed(3)
    paths = []
    for name in ("base", "a", "b"):
        tensors = {"w": torch.randn(4, 6, generator=g), "model.layers.0.x": torch.randn(5, generator=g),
                   "model.layers.1.x": torch.randn(5, generator=g), "steps": torch.arange(3) + len(paths)}
        paths.append(write_checkpoint(tmp_path / name, tensors, config={"model_type": "llama"}))
    return paths


def test_integer_tensors_are_copied_from_the_base(three: list[Path], tmp_path: Path) -> None:
    base, a, b = map(str, three)
    out = merge(recipe_from_cli("task_arithmetic", [a, b], base=base, params=["weight=1"]), tmp_path / "o")
    assert torch.equal(read_all(out)["steps"], torch.arange(3))


def test_linear_output_equals_the_formula(three: list[Path], tmp_path: Path) -> None:
    _base, a, b = map(str, three)
    out = merge(recipe_from_cli("linear", [a, b], params=["weight=3,1"]), tmp_path / "o")
    ta, tb = read_all(Path(a)), read_all(Path(b))
    torch.testing.assert_close(read_all(out)["w"], (3 * ta["w"] + tb["w"]) / 4)
    assert torch.equal(read_all(out)["steps"], ta["steps"])  # no base: copied from the first model


def test_shape_mismatch_names_the_tensor_both_shapes_and_both_models(tmp_path: Path) -> None:
    base = write_checkpoint(tmp_path / "base", {"w": torch.ones(2, 3), "v": torch.ones(2)})
    other = write_checkpoint(tmp_path / "other", {"w": torch.ones(3, 3), "v": torch.ones(3)})
    recipe = recipe_from_cli("task_arithmetic", [str(other)], base=str(base), params=["weight=1"])
    with pytest.raises(RecipeError) as info:
        with planned_merge(recipe):
            pass
    message = str(info.value)
    assert "2 problems" in message  # both tensors reported at once
    assert f"tensor 'w': shape [3, 3] in '{other}' but [2, 3] in '{base}'" in message


def test_vocabulary_size_mismatch_is_explained(tmp_path: Path) -> None:
    base = write_checkpoint(tmp_path / "base", {"model.embed_tokens.weight": torch.ones(10, 4)})
    other = write_checkpoint(tmp_path / "other", {"model.embed_tokens.weight": torch.ones(12, 4)})
    recipe = recipe_from_cli("task_arithmetic", [str(other)], base=str(base), params=["weight=1"])
    with pytest.raises(RecipeError, match="different vocabulary sizes"):
        with planned_merge(recipe):
            pass


def test_missing_tensor_is_reported(tmp_path: Path) -> None:
    base = write_checkpoint(tmp_path / "base", {"w": torch.ones(2), "v": torch.ones(2)})
    other = write_checkpoint(tmp_path / "other", {"w": torch.ones(2)})
    recipe = recipe_from_cli("task_arithmetic", [str(other)], base=str(base), params=["weight=1"])
    with pytest.raises(RecipeError, match=r"1 tensor\(s\) missing from '.*other'.*: v"):
        with planned_merge(recipe):
            pass


def test_output_equal_to_an_input_is_refused(three: list[Path]) -> None:
    _base, a, b = map(str, three)
    recipe = recipe_from_cli("linear", [a, b], params=["weight=1"])
    with pytest.raises(IncompatibleModelsError, match="would replace input"):
        merge(recipe, Path(a), overwrite=True)
    assert read_all(Path(a))["w"].shape == (4, 6)


def test_planning_reads_no_tensor_data(three: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    base, a, b = map(str, three)
    monkeypatch.setattr(Checkpoint, "read", lambda *a, **k: pytest.fail("tensor data was read"))
    recipe = recipe_from_cli("ties", [a, b], base=base, params=["weight=1", "density=0.5"])
    with planned_merge(recipe) as plan:
        assert plan.read_bytes > 0 and len(plan.tensors) == 4


def test_wise_ft_sweep_writes_one_output_per_alpha_in_one_read_pass(
    three: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, a, _ = map(str, three)
    reads: list[str] = []
    original = Checkpoint.read

    def counting(self, name, **kwargs):
        reads.append(name)
        return original(self, name, **kwargs)

    monkeypatch.setattr(Checkpoint, "read", counting)
    out = merge(recipe_from_cli("wise_ft", [a], base=base, params=["alpha=0,0.25,1"]), tmp_path / "o")
    assert sorted(p.name for p in out.iterdir()) == ["alpha_0", "alpha_0.25", "alpha_1"]
    assert len(reads) == 2 * 3 + 1  # each float tensor from both models once; the int tensor once
    zs, ft = read_all(Path(base)), read_all(Path(a))
    torch.testing.assert_close(read_all(out / "alpha_0.25")["w"], 0.75 * zs["w"] + 0.25 * ft["w"])
    assert torch.equal(read_all(out / "alpha_0")["w"], zs["w"])
    assert torch.equal(read_all(out / "alpha_1")["w"], ft["w"])
    assert (out / "alpha_1" / "README.md").exists() is False  # cards are outputs the caller asks for


def test_dare_is_reproducible_per_seed(three: list[Path], tmp_path: Path) -> None:
    base, a, b = map(str, three)

    def dare(seed: int, name: str) -> torch.Tensor:
        recipe = recipe_from_cli("dare_ties", [a, b], base=base, params=["weight=1", "density=0.5"], seed=seed)
        return read_all(merge(recipe, tmp_path / name))["w"]

    assert torch.equal(dare(1, "x"), dare(1, "y"))
    assert not torch.equal(dare(1, "x2"), dare(2, "z"))


def test_ties_model_scope_trims_by_the_whole_model_top_k(three: list[Path], tmp_path: Path) -> None:
    base, a, b = map(str, three)
    recipe = recipe_from_cli("ties", [a, b], base=base,
                             params=["weight=1,0.5", "density=0.3", "trim_scope=model"])
    out = read_all(merge(recipe, tmp_path / "o"))
    tb = read_all(Path(base))
    floats = [n for n in tb if tb[n].is_floating_point()]
    deltas = [{n: read_all(Path(p))[n] - tb[n] for n in floats} for p in (a, b)]
    thresholds = []
    for d in deltas:
        magnitudes = torch.cat([v.abs().reshape(-1) for v in d.values()])
        thresholds.append(magnitudes.sort(descending=True).values[int(0.3 * magnitudes.numel()) - 1])
    for n in floats:
        trimmed = torch.stack([d[n] * (d[n].abs() >= t) for d, t in zip(deltas, thresholds)])
        w = torch.tensor([1.0, 0.5]).reshape(-1, *[1] * tb[n].dim())
        weighted = trimmed * w
        agree = weighted.sign() == ((weighted.sum(0) >= 0).float() * 2 - 1)
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
        torch.testing.assert_close(out[n], tb[n] + (weighted * agree).sum(0) / divisor)


def test_model_scope_needs_one_density_per_model(three: list[Path]) -> None:
    base, a, b = map(str, three)
    recipe = recipe_from_cli("ties", [a, b], base=base,
                             params=["weight=1", "density=[0.2, 0.8]", "trim_scope=model"])
    with pytest.raises(RecipeError, match="one density for all tensors"):
        with planned_merge(recipe):
            pass


def test_gradient_parameters_follow_layer_positions(three: list[Path], tmp_path: Path) -> None:
    base, a, _ = map(str, three)
    out = read_all(merge(recipe_from_cli("slerp", [base, a], base=base, params=["t=[0, 1]"]), tmp_path / "o"))
    tb, ta = read_all(Path(base)), read_all(Path(a))
    assert torch.equal(out["model.layers.0.x"], tb["model.layers.0.x"])  # t = 0
    assert torch.equal(out["model.layers.1.x"], ta["model.layers.1.x"])  # t = 1
    assert torch.equal(out["w"], tb["w"])  # outside numbered layers: t = 0


def test_compute_dtype_changes_the_arithmetic(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    models = [write_checkpoint(tmp_path / f"m{i}", {"w": torch.randn(64, generator=g).to(torch.bfloat16)})
              for i in range(3)]
    base, a, b = map(str, models)
    outs = {}
    for dtype in ("float32", "bfloat16"):
        recipe = recipe_from_cli("task_arithmetic", [a, b], base=base, params=["weight=0.3,0.3"],
                                 compute_dtype=dtype, out_dtype="float32")
        outs[dtype] = read_all(merge(recipe, tmp_path / dtype))["w"]
    assert outs["float32"].dtype == torch.float32 and not torch.equal(outs["float32"], outs["bfloat16"])


def test_vocab_mismatch_base_keeps_the_base_vocabulary(tmp_path: Path) -> None:
    base_rows = torch.arange(12.0).reshape(6, 2)
    small = write_checkpoint(tmp_path / "small", {"model.embed_tokens.weight": base_rows[:4] + 1})
    # "big" is listed first in one run and "small" in the other: padding must use the base, not an input
    big_rows = torch.cat([base_rows + 2, torch.ones(2, 2)])
    big = write_checkpoint(tmp_path / "big", {"model.embed_tokens.weight": big_rows})
    base = write_checkpoint(tmp_path / "base", {"model.embed_tokens.weight": base_rows})
    expected = base_rows + 2 + torch.tensor([1.0] * 4 + [0.0] * 2).unsqueeze(1)  # small adds 1 on its 4 rows only
    for order in ((small, big), (big, small)):
        data = {"merge_method": "task_arithmetic", "base_model": str(base), "vocab_mismatch": "base",
                "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in order],
                "compute_dtype": "float32"}
        out = read_all(merge(parse_recipe(data), tmp_path / f"o-{order[0].name}"))["model.embed_tokens.weight"]
        assert torch.equal(out, expected)


@pytest.mark.parametrize("method,params", [("linear", ["weight=0.5,0.3"]), ("task_arithmetic", ["weight=0.7"])])
def test_elementwise_methods_merged_in_row_blocks_equal_whole_tensors(
    three: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, params: list[str]
) -> None:
    import mergekit_like.merge.options as options_module

    base, a, b = map(str, three)
    models = [a, b] if method == "linear" else [a]
    recipe = recipe_from_cli(method, models, base=None if method == "linear" else base, params=params)
    whole = read_all(merge(recipe, tmp_path / "whole"))
    monkeypatch.setattr(options_module, "MIN_MEMORY_BUDGET", 1)
    # Two float32 inputs: a quarter of 224 bytes holds 7 elements of each, and "w" is 4x6, so
    # blocks of one row; half the budget cannot hold the next item, so nothing is read ahead.
    with planned_merge(recipe, MergeOptions(memory_budget=224)) as plan:
        assert [t.chunks for t in plan.tensors if t.name == "w"] == [((0, 1), (1, 2), (2, 3), (3, 4))]
        run_merge(plan, tmp_path / "blocks")
    blocks = read_all(tmp_path / "blocks")
    assert all(torch.equal(whole[n], blocks[n]) for n in whole)


def test_a_memory_budget_below_the_minimum_is_refused(three: list[Path]) -> None:
    with pytest.raises(OptionsError, match="memory budget 1,000 bytes is below the minimum"):
        MergeOptions(memory_budget=1000)


def test_row_chunks_cover_every_row_within_budget() -> None:
    from mergekit_like.merge.plan import row_chunks

    assert row_chunks((10, 3), budget=100) is None
    chunks = row_chunks((10, 3), budget=7)
    assert chunks == ((0, 2), (2, 4), (4, 6), (6, 8), (8, 10))
    assert row_chunks((1, 1000), budget=10) is None  # one row cannot be split
    # A tensor pass's blocks hold two rows or more: a short last block joins the one before it.
    assert row_chunks((5, 3), budget=6, min_rows=2) == ((0, 2), (2, 5))
    assert row_chunks((5, 3), budget=3, min_rows=2) == ((0, 2), (2, 5))
    assert row_chunks((2, 1000), budget=10, min_rows=2) is None  # one block would be the whole tensor


def test_methods_without_a_base_copy_integer_tensors_from_a_listed_base(three: list[Path], tmp_path: Path) -> None:
    base, a, _ = map(str, three)  # "steps" differs: arange(3) + the model's index
    recipe = parse_recipe({"merge_method": "linear", "base_model": base,
                           "models": [{"model": a, "parameters": {"weight": 1.0}},
                                      {"model": base, "parameters": {"weight": 1.0}}]})
    out = read_all(merge(recipe, tmp_path / "o"))
    assert torch.equal(out["steps"], read_all(Path(base))["steps"])
    torch.testing.assert_close(out["w"], (read_all(Path(a))["w"] + read_all(Path(base))["w"]) / 2)


def test_a_listed_base_also_sets_the_default_output_dtype(tmp_path: Path) -> None:
    ft = write_checkpoint(tmp_path / "ft", {"w": torch.ones(2, 3)})
    base = write_checkpoint(tmp_path / "base", {"w": torch.zeros(2, 3, dtype=torch.bfloat16)})
    recipe = parse_recipe({"merge_method": "uniform_soup", "base_model": str(base),
                           "models": [str(ft), str(base)]})
    assert read_all(merge(recipe, tmp_path / "o"))["w"].dtype == torch.bfloat16


@pytest.mark.parametrize(("method", "ignored"), [
    ("task_arithmetic", {"int8_mask": True, "rescale": True, "density": 0.3}),
    ("dare_linear", {"int8_mask": True}),
    ("breadcrumbs", {"int8_mask": True}),
    ("ties", {"int8_mask": True}),
])
def test_parameters_mergekit_ignores_change_no_number(
    method: str, ignored: dict, three: list[Path], tmp_path: Path
) -> None:
    base, a, b = map(str, three)
    data = {"merge_method": method, "base_model": base, "parameters": {"weight": 0.6, "density": 0.5},
            "models": [{"model": a}, {"model": b}]}
    if method == "task_arithmetic":
        del data["parameters"]["density"]
    plain = read_all(merge(parse_recipe(data), tmp_path / "plain"))
    data["parameters"] = {**data["parameters"], **ignored}
    with_ignored = read_all(merge(parse_recipe(data), tmp_path / "ignored"))
    assert plain.keys() == with_ignored.keys()
    assert all(torch.equal(plain[n], with_ignored[n]) for n in plain)


def test_a_tensor_that_is_floating_in_one_model_and_integer_in_another_is_refused(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", {"w": torch.ones(4, dtype=torch.float16), "n": torch.ones(2)})
    b = write_checkpoint(tmp_path / "b", {"w": torch.ones(4, dtype=torch.int32), "n": torch.ones(2)})
    for first, second in ((a, b), (b, a)):  # refused whichever model comes first
        recipe = recipe_from_cli("linear", [str(first), str(second)], params=["weight=1,1"])
        with pytest.raises(RecipeError, match=r"tensor 'w': (int32|float16) in '.*' but (float16|int32) in"):
            plan_merge(recipe)


def test_floating_tensors_of_different_precision_still_merge(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", {"w": torch.ones(4, dtype=torch.bfloat16)})
    b = write_checkpoint(tmp_path / "b", {"w": torch.full((4,), 3.0)})
    recipe = recipe_from_cli("linear", [str(a), str(b)], params=["weight=1,1"])
    out = merge(recipe, tmp_path / "out")
    with open_checkpoint(out) as ckpt:
        assert torch.equal(ckpt.read("w"), torch.full((4,), 2.0, dtype=torch.bfloat16))
