"""DELLA on large tensors, row block by row block: the whole tensor's masks and L1 rescale, to the bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_row_block_merge_equals_whole, merge_in_row_blocks

import mergekit_like.merge.options as options_module
from mergekit_like.methods import block_della, flat_units, get_method
from mergekit_like.methods.block_della import BlockDella

WEIGHTS = [1.0, 0.5, 0.8]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.dtype.itemsize])


@pytest.fixture
def small_units(monkeypatch: pytest.MonkeyPatch) -> None:
    # Sums over units that straddle the blocks; the streams advanced in steps smaller than a model.
    monkeypatch.setattr(flat_units, "SUM_UNIT", 37)
    monkeypatch.setattr(block_della, "ADVANCE_STEP", 100)


@pytest.mark.usefixtures("small_units")
@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_row_blocks_give_the_whole_tensors_bits(method: str, dtype: torch.dtype, rescale: bool, rows: int) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 23, generator=g).to(dtype)
    models = [base + 0.01 * torch.randn(40, 23, generator=g).to(dtype) for _ in range(3)]
    params = {"weight": WEIGHTS, "density": [0.4, 1.0 if rows == 3 else 0.0, 0.6], "epsilon": [0.1, 0.1, 0.2],
              "rescale": rescale}
    whole = get_method(method)(models, base=base, generator=torch.Generator().manual_seed(11), **params)
    blocks = merge_in_row_blocks(method, models, base, rows, params, seed=11)
    assert torch.equal(_bits(blocks), _bits(whole))


@pytest.mark.usefixtures("small_units")
def test_models_in_their_stored_dtype_beside_a_float32_base() -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(30, 17, generator=g)
    models = [(base + 0.02 * torch.randn(30, 17, generator=g)).to(torch.bfloat16) for _ in range(2)]
    params = {"weight": [1.0, 1.0], "density": [0.5, 0.3], "epsilon": [0.1, 0.1], "rescale": True}
    whole = get_method("della")(models, base=base, generator=torch.Generator().manual_seed(4), **params)
    assert torch.equal(merge_in_row_blocks("della", models, base, 7, params, seed=4), whole)


def test_on_a_gpu_tensors_merge_whole() -> None:
    params = {"density": [0.5], "epsilon": [0.1], "rescale": True}
    assert BlockDella().blockwise(params, torch.float32, "cpu")
    assert not BlockDella().blockwise(params, torch.float32, "cuda")  # a CUDA draw's stream depends on its size
    assert BlockDella().passes(params, torch.float32) == 1
    assert BlockDella().passes({**params, "rescale": False}, torch.float32) == 0


@pytest.mark.usefixtures("small_units")
@pytest.mark.parametrize("method,rescale", [("della", True), ("della_linear", False)])
def test_a_merge_under_a_small_budget_equals_the_whole_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              method: str, rescale: bool) -> None:
    monkeypatch.setattr(options_module, "MIN_MEMORY_BUDGET", 1)
    g = torch.Generator().manual_seed(5)
    tensors = [{"model.embed_tokens.weight": torch.randn(96, 16, generator=g).to(torch.bfloat16),
                "model.norm.weight": torch.randn(16, generator=g).to(torch.bfloat16)} for _ in range(3)]
    recipe = {"merge_method": method, "dtype": "float32", "seed": 3,
              "parameters": {"density": 0.4, "epsilon": 0.1, "rescale": rescale}}
    assert_row_block_merge_equals_whole(tensors, recipe, tmp_path, 1 if rescale else 0)


@pytest.mark.parametrize("shape", [(40, 23), (12, 5, 7)])
def test_rows_ranked_and_drawn_a_group_at_a_time_give_the_one_draw(monkeypatch: pytest.MonkeyPatch,
                                                                    shape: tuple[int, ...]) -> None:
    """mergekit ranks and draws the whole tensor at once; a group of rows at a time draws the same."""
    from mergekit_like.methods import task_vectors
    from mergekit_like.methods.task_vectors import della_keep_probabilities, della_mask

    monkeypatch.setattr(task_vectors, "DELLA_ROW_GROUP", 50)
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    probs = della_keep_probabilities(delta, 0.4, 0.1, torch.float32)
    expected = torch.bernoulli(probs, generator=torch.Generator().manual_seed(8)).reshape(-1).bool()
    assert torch.equal(della_mask(delta, 0.4, 0.1, torch.float32, torch.Generator().manual_seed(8)), expected)
