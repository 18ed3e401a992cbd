"""SCE on large tensors, row block by row block: the whole tensor's energies and bits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import assert_row_block_merge_equals_whole, merge_in_row_blocks

import mergekit_like.merge.options as options_module
from mergekit_like.methods import flat_units, get_method
from mergekit_like.methods.sce import energy_weights


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.dtype.itemsize])


def _models(dtype: torch.dtype, count: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(40, 23, generator=g).to(dtype)
    return base, [base + 0.05 * torch.randn(40, 23, generator=g).to(dtype) for _ in range(count)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("unit", [37, 1 << 20])  # sums over units straddling the blocks, or one unit
def test_row_blocks_give_the_whole_tensors_bits(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, rows: int,
                                                unit: int) -> None:
    monkeypatch.setattr(flat_units, "SUM_UNIT", unit)
    base, models = _models(dtype)
    whole = get_method("sce")(models, base=base)
    blocks = merge_in_row_blocks("sce", models, base, rows, {"select_topk": 1.0})
    assert torch.equal(_bits(blocks), _bits(whole))


def test_one_unit_is_reduced_as_mergekit_reduces_it() -> None:
    base, models = _models(torch.bfloat16)
    task_vectors = torch.stack([x - base for x in models])
    energy = task_vectors.square().reshape(3, -1).mean(dim=1)
    assert torch.equal(energy_weights(task_vectors), energy / torch.sum(energy).item())


def test_energies_over_several_units_are_the_closed_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flat_units, "SUM_UNIT", 64)
    base, models = _models(torch.float32, seed=2)
    task_vectors = torch.stack([x - base for x in models]).double()
    energy = task_vectors.square().reshape(3, -1).mean(dim=1)
    torch.testing.assert_close(energy_weights(task_vectors.float()).double(), energy / energy.sum(),
                               rtol=1e-6, atol=0)


def test_a_selection_merges_whole() -> None:
    method = get_method("sce")
    assert method.merges_row_blocks([{"select_topk": 1.0}], torch.float32, "cpu")
    assert not method.merges_row_blocks([{"select_topk": 0.5}], torch.float32, "cpu")  # topk breaks ties


def test_a_merge_under_a_small_budget_equals_the_whole_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(options_module, "MIN_MEMORY_BUDGET", 1)
    monkeypatch.setattr(flat_units, "SUM_UNIT", 100)
    g = torch.Generator().manual_seed(5)
    tensors = [{"model.embed_tokens.weight": torch.randn(96, 16, generator=g).to(torch.bfloat16),
                "model.norm.weight": torch.randn(16, generator=g).to(torch.bfloat16)} for _ in range(3)]
    assert_row_block_merge_equals_whole(tensors, {"merge_method": "sce", "dtype": "float32"}, tmp_path, 1)
