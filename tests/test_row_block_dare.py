"""DARE on large tensors, row block by row block: the whole tensor's masks and L1 rescale, to the bit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import assert_row_block_merge_equals_whole, merge_in_row_blocks

import mergekit_like.merge.options as options_module
import mergekit_like.methods.task_vectors as tv
from mergekit_like.methods import flat_units, get_method
from mergekit_like.methods.block_dare import BlockDrop
from mergekit_like.methods.l1_sums import UnitSums

WEIGHTS = [1.0, 0.5, 0.8]


@pytest.fixture
def small_units(monkeypatch: pytest.MonkeyPatch) -> None:
    # Units of a few rows: draws and sums straddle the row blocks.
    monkeypatch.setattr(tv, "DRAW_UNIT", 50)
    monkeypatch.setattr(flat_units, "SUM_UNIT", 37)


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(11)


def _in_row_blocks(method: str, models: list[torch.Tensor], base: torch.Tensor, rows: int, **params) -> torch.Tensor:
    full = {"weight": WEIGHTS, "rescale": True, "rescale_mode": "l1", **params}
    return merge_in_row_blocks(method, models, base, rows, full, seed=11)


@pytest.mark.usefixtures("small_units")
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rescale,mode", [(True, "l1"), (True, "inverse_density"), (False, "l1")])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_row_blocks_give_the_whole_tensors_bits(method: str, dtype: torch.dtype, rescale: bool, mode: str,
                                               rows: int) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 23, generator=g).to(dtype)
    models = [base + 0.01 * torch.randn(40, 23, generator=g).to(dtype) for _ in range(3)]
    params = {"density": [0.3, 1.0, 0.0 if rows == 3 else 0.6], "rescale": rescale, "rescale_mode": mode}
    whole = get_method(method)(models, base=base, weight=WEIGHTS, generator=_generator(), **params)
    blocks = _in_row_blocks(method, models, base, rows, **params)
    assert torch.equal(blocks.view(torch.int16 if dtype.itemsize == 2 else torch.int32),
                       whole.view(torch.int16 if dtype.itemsize == 2 else torch.int32))


def test_unit_sums_do_not_depend_on_the_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flat_units, "SUM_UNIT", 64)
    values = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    whole = UnitSums(1000)
    whole.add(values)
    expected = math.fsum(float(values[i : i + 64].sum()) for i in range(0, 1000, 64))
    assert whole.value() == expected
    for cuts in ([1, 2, 3, 500, 994], [63, 64, 65, 127, 129], list(range(0, 1000, 7))):
        pieces = UnitSums(1000)
        for start, stop in zip([0, *cuts], [*cuts, 1000]):
            pieces.add(values[start:stop])
        assert pieces.value() == expected


def test_only_the_l1_rescale_needs_a_pass() -> None:
    tensor_pass = BlockDrop()
    params = {"density": [0.5, 1.0], "rescale": True, "rescale_mode": "l1"}
    assert tensor_pass.passes(params, torch.float32) == 1
    assert tensor_pass.passes({**params, "rescale_mode": "inverse_density"}, torch.float32) == 0
    assert tensor_pass.passes({**params, "rescale": False}, torch.float32) == 0
    assert tensor_pass.passes({**params, "density": [1.0, 1.0]}, torch.float32) == 0


@pytest.mark.usefixtures("small_units")
@pytest.mark.parametrize("method,mode", [("dare_ties", "l1"), ("dare_linear", "inverse_density")])
def test_a_merge_under_a_small_budget_equals_the_whole_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              method: str, mode: str) -> None:
    monkeypatch.setattr(options_module, "MIN_MEMORY_BUDGET", 1)
    g = torch.Generator().manual_seed(5)
    tensors = [{"model.embed_tokens.weight": torch.randn(96, 16, generator=g).to(torch.bfloat16),
                "model.norm.weight": torch.randn(16, generator=g).to(torch.bfloat16)} for _ in range(3)]
    recipe = {"merge_method": method, "dtype": "float32", "seed": 3,
              "parameters": {"density": 0.4, "rescale_mode": mode}}
    assert_row_block_merge_equals_whole(tensors, recipe, tmp_path, 1 if mode == "l1" else 0)
