"""TIES on large tensors, row block by row block: a pass finds each trim's threshold, the merge keeps its bits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_row_block_merge_equals_whole, merge_in_row_blocks, quantised

import mergekit_like.merge.options as options_module
from mergekit_like.methods import block_topk, flat_units, get_method
from mergekit_like.methods.block_topk import BlockTopK

TIES = get_method("ties")


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """Bit patterns: equal values with different bits (zero's signs) count as different."""
    return tensor.view(torch.int16 if tensor.dtype.itemsize == 2 else torch.int32)


def _in_row_blocks(models: list[torch.Tensor], base: torch.Tensor, rows: int, **params) -> torch.Tensor:
    full = {"density": [1.0] * len(models), "trim_scope": "tensor", "trim_ties": "index", "rescale": False,
            **params}
    return merge_in_row_blocks("ties", models, base, rows, {"weight": [1.0, 0.5, 0.8], **full})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("trim_ties", ["index", "keep"])
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("levels", [64.0, 1 << 14])  # 1 << 14: magnitudes need more bits than bfloat16's
@pytest.mark.parametrize("slice_size", [None, 37])  # slices of a block: ties are counted across them too
@pytest.mark.parametrize("rescale", [False, True])  # L1 sums over units that straddle the blocks
def test_row_blocks_give_the_whole_tensors_bits(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, trim_ties: str, rows: int, levels: float,
    slice_size: int | None, rescale: bool,
) -> None:
    if slice_size is not None:
        monkeypatch.setattr(block_topk, "BLOCK", slice_size)
    monkeypatch.setattr(flat_units, "SUM_UNIT", 101)
    base = quantised((64, 48), 0, dtype)
    models = [base + quantised((64, 48), seed, dtype, levels) for seed in (1, 2, 3)]
    params = {"density": [0.3, 0.55, 0.8], "trim_ties": trim_ties, "rescale": rescale}
    whole = TIES(models, base=base, weight=[1.0, 0.5, 0.8], **params)
    assert torch.equal(_bits(_in_row_blocks(models, base, rows, **params)), _bits(whole))


def test_models_in_their_stored_dtype_and_densities_zero_and_one() -> None:
    # TIES takes bf16 models beside a float32 base (inputs_as_stored); density 0 keeps nothing, 1 everything.
    base = quantised((40, 30), 4, torch.float32)
    models = [(base + quantised((40, 30), seed, torch.float32)).to(torch.bfloat16) for seed in (5, 6, 7)]
    params = {"density": [0.0, 1.0, 0.4], "trim_ties": "index"}
    whole = TIES(models, base=base, weight=[1.0, 0.5, 0.8], **params)
    assert torch.equal(_in_row_blocks(models, base, 3, **params), whole)


def test_every_tie_at_the_cut_in_one_block_or_spread() -> None:
    # All magnitudes equal: "index" keeps the first k in flat order, whichever block they fall in.
    base = torch.zeros(10, 10)
    models = [torch.ones(10, 10) * s for s in (1.0, -1.0, 1.0)]
    params = {"density": [0.33, 0.5, 0.07], "trim_ties": "index"}
    whole = TIES(models, base=base, weight=[1.0, 0.5, 0.8], **params)
    assert torch.equal(_in_row_blocks(models, base, 3, **params), whole)


def test_what_merges_whole() -> None:
    tensor_pass = BlockTopK()
    trimmed = {"density": [0.5], "trim_scope": "tensor", "trim_ties": "index", "rescale": False}
    assert tensor_pass.blockwise(trimmed, torch.float32, "cpu")
    exact = {**trimmed, "trim_ties": "sort"}
    assert tensor_pass.blockwise(exact, torch.float32, "cpu") and tensor_pass.passes(exact, torch.float32) == 1
    assert tensor_pass.passes({**exact, "density": [0.5, 1.0, 0.2]}, torch.float32) == 2  # one per trimmed model
    assert not tensor_pass.blockwise(exact, torch.float32, "cuda")  # the device's own sort, of the whole tensor
    assert not tensor_pass.blockwise({**exact, "trim_scope": "model"}, torch.float32, "cpu")
    assert tensor_pass.blockwise({**trimmed, "rescale": True}, torch.float32, "cpu")
    assert tensor_pass.passes({**trimmed, "rescale": True}, torch.bfloat16) == 2  # the sums after the cut
    assert not tensor_pass.blockwise({**trimmed, "trim_scope": "model"}, torch.float32, "cpu")
    assert not tensor_pass.blockwise(trimmed, torch.float64, "cpu")  # float64 keys do not fit the float32 selection
    untrimmed = {**trimmed, "density": [1.0], "trim_ties": "sort"}
    assert tensor_pass.blockwise(untrimmed, torch.float64, "cpu") and tensor_pass.passes(untrimmed, torch.float64) == 0
    assert tensor_pass.passes(trimmed, torch.bfloat16) == 1 and tensor_pass.passes(trimmed, torch.float32) == 2


def test_blocks_out_of_order_are_refused() -> None:
    base = torch.zeros(4, 4)
    full = {"density": [0.5], "trim_scope": "tensor", "trim_ties": "index", "rescale": False}
    reduction = BlockTopK().start(full, base.numel(), base.device, None)
    reduction.observe(0, [torch.randn(4, 4)], base)
    reduction.end_pass(0)
    reduction.block((0, 2))
    with pytest.raises(RuntimeError, match="out of order"):
        reduction.block((3, 4))


@pytest.mark.parametrize("dtype,trim_ties,rescale", [("bfloat16", "index", False), ("float32", "keep", False),
                                                    ("float16", "index", False), ("bfloat16", "keep", True),
                                                    ("float32", "index", True)])
def test_a_merge_under_a_small_budget_equals_the_whole_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, trim_ties: str, rescale: bool
) -> None:
    monkeypatch.setattr(options_module, "MIN_MEMORY_BUDGET", 1)
    monkeypatch.setattr(flat_units, "SUM_UNIT", 100)
    tensors = [{"model.embed_tokens.weight": quantised((96, 16), seed, torch.bfloat16),
                "model.norm.weight": quantised((16,), seed + 10, torch.bfloat16)} for seed in range(3)]
    recipe = {"merge_method": "ties", "dtype": dtype,
              "parameters": {"trim_ties": trim_ties, "density": 0.4, "rescale": rescale}}
    assert_row_block_merge_equals_whole(tensors, recipe, tmp_path, (1 if dtype == "bfloat16" else 2) + rescale)


@pytest.mark.parametrize("dtype,rescale", [("bfloat16", False), ("float32", True)])
def test_exact_ties_under_a_small_budget_equal_the_whole_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, rescale: bool
) -> None:
    monkeypatch.setattr(options_module, "MIN_MEMORY_BUDGET", 1)
    tensors = [{"model.embed_tokens.weight": quantised((96, 16), seed, torch.bfloat16),
                "model.norm.weight": quantised((16,), seed + 10, torch.bfloat16)} for seed in range(3)]
    recipe = {"merge_method": "ties", "dtype": dtype, "parameters": {"density": 0.4, "rescale": rescale}}
    assert_row_block_merge_equals_whole(tensors, recipe, tmp_path, 2)  # a pass per trimmed model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("trim_ties", ["index", "keep"])
def test_nan_and_infinite_magnitudes_cut_as_in_the_whole_tensor(dtype: torch.dtype, trim_ties: str) -> None:
    # NaN magnitudes count as the largest: with more NaNs than k, the k-th largest is a NaN.
    base = quantised((30, 20), 8, dtype)
    models = [base + quantised((30, 20), seed, dtype) for seed in (1, 2, 3)]
    models[0].view(-1)[::3] = float("nan")
    models[1].view(-1)[::7] = float("inf")
    models[2].view(-1)[5::11] = float("nan")
    params = {"density": [0.2, 0.1, 0.5], "trim_ties": trim_ties}
    whole = TIES(models, base=base, weight=[1.0, 0.5, 0.8], **params)
    blocks = _in_row_blocks(models, base, 4, **params)
    # The same entries are NaN; their payloads may differ, as torch's arithmetic on slices gives them.
    assert torch.equal(blocks.isnan(), whole.isnan())
    assert torch.equal(_bits(blocks)[~whole.isnan()], _bits(whole)[~whole.isnan()])


@pytest.mark.parametrize("trim_ties", ["index", "keep"])
@pytest.mark.parametrize("rescale", [False, True])
def test_magnitude_prune_shares_the_row_block_trim(monkeypatch: pytest.MonkeyPatch, trim_ties: str,
                                                   rescale: bool) -> None:
    monkeypatch.setattr(flat_units, "SUM_UNIT", 101)
    base = quantised((64, 48), 0, torch.bfloat16)
    models = [base + quantised((64, 48), seed, torch.bfloat16) for seed in (1, 2)]
    params = {"weight": [1.0, 0.6], "density": [0.3, 0.7], "trim_ties": trim_ties, "rescale": rescale}
    whole = get_method("magnitude_prune")(models, base=base, **params)
    assert torch.equal(_bits(merge_in_row_blocks("magnitude_prune", models, base, 5, params)), _bits(whole))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("rows", [1, 7])
def test_exact_trims_in_row_blocks_give_the_whole_tensors_bits(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, method: str, rescale: bool, rows: int
) -> None:
    # Exact ties: the masks are the whole tensor's sort's, whichever block an entry falls in.
    monkeypatch.setattr(flat_units, "SUM_UNIT", 101)
    base = quantised((64, 48), 0, dtype)
    models = [base + quantised((64, 48), seed, dtype) for seed in (1, 2, 3)]
    params = {"weight": [1.0, 0.5, 0.8], "density": [0.3, 1.0, 0.0 if method == "ties" else 0.8],
              "trim_ties": "sort", "rescale": rescale}
    whole = get_method(method)(models, base=base, **params)
    full = {"trim_scope": "tensor", **params} if method == "ties" else params
    assert torch.equal(_bits(merge_in_row_blocks(method, models, base, rows, full)), _bits(whole))


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rescale", [False, True])
def test_breadcrumbs_in_row_blocks_give_the_whole_tensors_bits(
    monkeypatch: pytest.MonkeyPatch, method: str, dtype: torch.dtype, rescale: bool
) -> None:
    monkeypatch.setattr(flat_units, "SUM_UNIT", 101)
    base = quantised((64, 48), 0, dtype)
    models = [base + quantised((64, 48), seed, dtype) for seed in (1, 2, 3)]
    params = {"weight": [1.0, 0.5, 0.8], "density": [0.5, 0.3, 1.0], "gamma": [0.01, 0.1, 0.0], "rescale": rescale}
    whole = get_method(method)(models, base=base, **params)
    assert torch.equal(_bits(merge_in_row_blocks(method, models, base, 5, params)), _bits(whole))


def test_breadcrumbs_under_a_small_budget_equal_the_whole_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(options_module, "MIN_MEMORY_BUDGET", 1)
    tensors = [{"model.embed_tokens.weight": quantised((96, 16), seed, torch.bfloat16),
                "model.norm.weight": quantised((16,), seed + 10, torch.bfloat16)} for seed in range(3)]
    recipe = {"merge_method": "breadcrumbs_ties", "dtype": "float32", "parameters": {"density": 0.6, "gamma": 0.05}}
    assert_row_block_merge_equals_whole(tensors, recipe, tmp_path, 2)
