"""slerp and model_stock on large tensors, row block by row block: the whole tensor's bits."""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path

import pytest
import torch
from helpers import assert_row_block_merge_equals_whole, merge_in_row_blocks

import mergekit_like.merge.options as options_module
import mergekit_like.methods.slerp as slerp_module
from mergekit_like.methods import flat_units, get_method
from mergekit_like.methods.model_stock import stock_amplification, stock_ratio


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.dtype.itemsize])


def _models(dtype: torch.dtype, count: int, seed: int = 0, shape: tuple[int, int] = (40, 23)):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    return base, [base + 0.05 * torch.randn(shape, generator=g).to(dtype) for _ in range(count)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("chunk", [37, 1 << 20])  # chunks straddling the blocks, or one chunk
def test_slerp_row_blocks_give_the_whole_tensors_bits(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                                      rows: int, chunk: int) -> None:
    monkeypatch.setattr(slerp_module, "CHUNK", chunk)
    base, (other,) = _models(dtype, 1)
    whole = get_method("slerp")([other], base=base, t=0.3)
    assert torch.equal(_bits(merge_in_row_blocks("slerp", [other], base, rows, {"t": 0.3})), _bits(whole))


def test_slerp_of_colinear_rows_in_blocks_is_linear() -> None:
    base, _ = _models(torch.float32, 1)
    out = merge_in_row_blocks("slerp", [2 * base], base, 7, {"t": 0.25})
    assert torch.equal(out, get_method("slerp")([2 * base], base=base, t=0.25))
    torch.testing.assert_close(out, 1.25 * base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("unit", [37, 1 << 20])  # sums over units straddling the blocks, or one unit
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_row_blocks_give_the_whole_tensors_bits(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                                            rows: int, unit: int, filter_wise: bool) -> None:
    monkeypatch.setattr(flat_units, "SUM_UNIT", unit)
    base, models = _models(dtype, 3)
    whole = get_method("model_stock")(models, base=base, filter_wise=filter_wise)
    blocks = merge_in_row_blocks("model_stock", models, base, rows, {"filter_wise": filter_wise})
    assert torch.equal(_bits(blocks), _bits(whole))


def test_model_stock_of_one_unit_is_reduced_as_mergekit_reduces_it() -> None:
    base, models = _models(torch.bfloat16, 3)
    rows = base.reshape(-1)
    t = stock_ratio([x.reshape(-1) - rows for x in models])
    expected = (t * (sum(m.reshape(-1) for m in models) / 3) + (1 - t) * rows).reshape(base.shape)
    assert torch.equal(get_method("model_stock")(models, base=base), expected)


def test_model_stock_over_several_units_is_the_closed_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """t from the units' Gram matrices: the closed form in float64, to float32's precision."""
    monkeypatch.setattr(flat_units, "SUM_UNIT", 50)
    base, models = _models(torch.float32, 3, seed=4)
    deltas = [(x - base).reshape(-1) for x in models]
    norms = [math.sqrt(math.fsum(float(v) ** 2 for v in d.double())) for d in deltas]
    cosines = [math.fsum((a.double() * b.double()).tolist()) / (norms[i] * norms[j])
               for (i, a), (j, b) in combinations(enumerate(deltas), 2)]
    cos = sum(cosines) / 3
    t = 3 * cos / (1 + 2 * cos)
    out = get_method("model_stock")(models, base=base)
    mean = sum(models) / 3
    torch.testing.assert_close(out, t * mean + (1 - t) * base, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_amplification_of_row_blocks_is_the_tensors(monkeypatch: pytest.MonkeyPatch,
                                                                filter_wise: bool) -> None:
    """Nearly opposite task vectors: the factor the engine logs over the blocks is the whole tensor's."""
    monkeypatch.setattr(flat_units, "SUM_UNIT", 64)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(30, 12, generator=g, dtype=torch.float64)
    d = torch.randn(30, 12, generator=g, dtype=torch.float64)
    models = [base + d, base - 0.98 * d + 0.01 * torch.randn(30, 12, generator=g, dtype=torch.float64)]
    method = get_method("model_stock")
    whole = stock_amplification(method(models, base=base, filter_wise=filter_wise), models, base=base,
                                filter_wise=filter_wise)
    tensor_pass = method.tensor_pass
    params = {"filter_wise": filter_wise}
    reduction = tensor_pass.start(params, base.numel(), base.device, None)
    for pass_index in range(tensor_pass.passes(params, base.dtype)):
        for start in range(0, 30, 7):
            reduction.observe(pass_index, [m[start : start + 7] for m in models], base[start : start + 7])
        reduction.end_pass(pass_index)
    factors = []
    for start in range(0, 30, 7):
        rows = (start, min(start + 7, 30))
        block = reduction.block(rows)
        parts = [m[rows[0] : rows[1]] for m in models]
        merged = method(parts, base=base[rows[0] : rows[1]], filter_wise=filter_wise, block_stock=block)
        factors.append(stock_amplification(merged, parts, base=base[rows[0] : rows[1]], filter_wise=filter_wise,
                                           block_stock=block))
    assert whole > 10
    assert max(factors) == pytest.approx(whole, rel=1e-9)


@pytest.mark.parametrize("method,params,passes", [
    ("slerp", {"t": 0.4}, 2),
    ("model_stock", {}, 1),
    ("model_stock", {"filter_wise": True}, 0),
    ("nuslerp", {"nuslerp_flatten": False}, 0),
])
def test_a_merge_under_a_small_budget_equals_the_whole_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              method: str, params: dict, passes: int) -> None:
    monkeypatch.setattr(options_module, "MIN_MEMORY_BUDGET", 1)
    monkeypatch.setattr(flat_units, "SUM_UNIT", 100)
    monkeypatch.setattr(slerp_module, "CHUNK", 100)
    g = torch.Generator().manual_seed(5)
    count = 2 if method == "slerp" else 3
    tensors = [{"model.embed_tokens.weight": torch.randn(96, 16, generator=g).to(torch.bfloat16),
                "model.norm.weight": torch.randn(16, generator=g).to(torch.bfloat16)} for _ in range(count)]
    recipe = {"merge_method": method, "dtype": "float32", "parameters": params}
    assert_row_block_merge_equals_whole(tensors, recipe, tmp_path, passes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_of_rows_merges_row_blocks_as_the_whole(dtype: torch.dtype, with_base: bool) -> None:
    base, models = _models(dtype, 2)
    params = {"weight": [0.3, 0.9], "nuslerp_flatten": False, "nuslerp_row_wise": False}
    extra = {"base": base} if with_base else {}
    whole = get_method("nuslerp")(models, **extra, **params)
    method = get_method("nuslerp")
    blocks = torch.cat([method([m[a : a + 7] for m in models], **({"base": base[a : a + 7]} if with_base else {}),
                               **params, block_rows=None) for a in range(0, 40, 7)])
    assert torch.equal(_bits(blocks), _bits(whole))
    assert method.merges_row_blocks([params], dtype, "cpu")
    assert not method.merges_row_blocks([{**params, "nuslerp_flatten": True}], dtype, "cpu")  # one vector: the tensor
    assert not method.merges_row_blocks([{**params, "nuslerp_row_wise": True}], dtype, "cpu")  # down the columns


@pytest.mark.parametrize("method,params", [
    ("model_stock", {"filter_wise": True}),
    ("nuslerp", {"weight": [0.3, 0.9], "nuslerp_flatten": False, "nuslerp_row_wise": False}),
    ("model_stock", {"filter_wise": False}),
    ("slerp", {"t": 0.4}),
])
def test_wide_rows_in_the_planners_blocks_give_the_whole_tensors_bits(method: str, params: dict) -> None:
    """Rows long enough for torch to split one row's reduction across threads when it is a block's
    only row (the planner's blocks hold two or more)."""
    from mergekit_like.merge.plan import TENSOR_PASS_MIN_ROWS, row_chunks

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        base, models = _models(torch.float32, 1 if method == "slerp" else 2, shape=(5, 40_000))
        blocks = row_chunks(base.shape, 2 * 40_000, TENSOR_PASS_MIN_ROWS)
        assert blocks == ((0, 2), (2, 5))
        whole = get_method(method)(models, base=base, **params)
        assert torch.equal(_bits(merge_in_row_blocks(method, models, base, 2, params, blocks=blocks)), _bits(whole))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_model_stock_merged_whole_by_the_engine_equals_the_kernel(tmp_path: Path, device: str) -> None:
    """A tensor merged whole gets t from the engine's Gram pass (with the amplification factor); for a
    tensor of one unit that t is the kernel's own, mergekit's, also where the task vectors' rows would
    start off an aligned address (an odd number of entries)."""
    from helpers import write_checkpoint

    from mergekit_like.io import open_checkpoint
    from mergekit_like.merge.engine import MergeOptions, planned_merge, run_merge
    from mergekit_like.merge.recipe import parse_recipe

    g = torch.Generator().manual_seed(5)
    tensors = [{"model.embed_tokens.weight": torch.randn(97, 15, generator=g),
                "model.norm.weight": torch.randn(15, generator=g)} for _ in range(4)]
    paths = [write_checkpoint(tmp_path / f"model-{i}", t, config={"model_type": "llama"})
             for i, t in enumerate(tensors)]
    recipe = parse_recipe({"merge_method": "model_stock", "dtype": "float32", "base_model": str(paths[0]),
                           "models": [{"model": str(p)} for p in paths[1:]]})
    with planned_merge(recipe, MergeOptions(device=device)) as plan:
        assert all(t.chunks is None for t in plan.tensors)
        run_merge(plan, tmp_path / "out")
    with open_checkpoint(tmp_path / "out") as merged:
        assert sorted(merged.names()) == sorted(tensors[0])
        for name in merged.names():
            base, *models = (t[name].to(device) for t in tensors)
            assert torch.equal(merged.read(name), get_method("model_stock")(models, base=base).cpu())
