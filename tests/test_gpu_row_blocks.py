"""Whole-tensor methods merged in row blocks on CUDA give the bytes of the whole tensor merged on CUDA
(skipped without CUDA): the pre-passes, trims, draws and per-unit sums do not depend on the block
size on the GPU either."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_row_block_merge_equals_whole, quantised

import mergekit_like.merge.options as options_module

pytestmark = pytest.mark.gpu


def _models(count: int, on_grid: bool) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)

    def values(shape: tuple[int, ...], seed: int) -> torch.Tensor:
        return quantised(shape, seed, torch.bfloat16) if on_grid else torch.randn(shape, generator=g).to(torch.bfloat16)

    return [{"model.embed_tokens.weight": values((96, 16), seed),
             "model.norm.weight": values((16,), seed + 10)} for seed in range(count)]


RECIPES: list[tuple[str, dict[str, Any], int, bool]] = [
    # (method, parameters, models including the base, values on a coarse grid)
    ("ties", {"density": 0.4}, 3, True),
    ("ties", {"density": 0.4, "rescale": True}, 3, True),
    ("ties", {"density": 0.4, "trim_ties": "index"}, 4, True),
    ("ties", {"density": 0.4, "trim_ties": "keep", "rescale": True}, 4, True),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.05}, 3, True),
    ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.05}, 3, True),
    ("dare_ties", {"density": 0.4}, 4, False),
    ("dare_linear", {"density": 0.4, "rescale_mode": "inverse_density"}, 4, False),
    ("della", {"density": 0.4, "epsilon": 0.1, "rescale": True}, 3, False),
    ("model_stock", {}, 3, False),
    ("slerp", {"t": 0.3}, 2, False),
    ("sce", {}, 3, False),
]


@pytest.mark.parametrize("method,params,count,on_grid", RECIPES,
                         ids=[f"{m}-{'-'.join(map(str, p.values())) or 'defaults'}" for m, p, _, _ in RECIPES])
def test_row_blocks_on_cuda_equal_the_whole_tensor_on_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, params: dict[str, Any], count: int, on_grid: bool
) -> None:
    monkeypatch.setattr(options_module, "MIN_MEMORY_BUDGET", 1)
    recipe = {"merge_method": method, "dtype": "float32", "seed": 3, "parameters": params}
    assert_row_block_merge_equals_whole(_models(count, on_grid), recipe, tmp_path, None, device="cuda")
