"""The CUDA path gives the CPU path's numbers (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergekit_like.engine import planned_merge, run_merge
from mergekit_like.io import open_checkpoint
from mergekit_like.recipe import recipe_from_cli

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method,params", [
    ("linear", ["weight=0.5,0.3,0.2"]),
    ("ties", ["weight=1,0.6,0.3", "density=0.5"]),
    ("slerp", ["t=0.3"]),
    ("model_stock", []),
])
def test_cuda_merge_matches_cpu(example_models_f32: list[Path], tmp_path: Path, method: str, params: list[str]) -> None:
    base, *fts = map(str, example_models_f32)
    models = [base, fts[0]] if method == "slerp" else fts
    recipe = recipe_from_cli(method, models, base=None if method == "linear" else base, params=params)
    outputs = {}
    for device in ("cpu", "cuda"):
        with planned_merge(recipe) as plan:
            run_merge(plan, tmp_path / device, device=device)
        with open_checkpoint(tmp_path / device) as ckpt:
            outputs[device] = {n: ckpt.read(n) for n in ckpt.names()}
    for name, expected in outputs["cpu"].items():
        torch.testing.assert_close(outputs["cuda"][name], expected, rtol=1e-5, atol=1e-6)


def test_index_trim_keeps_the_same_entries_on_cuda() -> None:
    from mergekit_like.methods.task_vectors import magnitude_mask

    g = torch.Generator().manual_seed(0)
    base = torch.randn(2_000_000, generator=g).bfloat16()
    magnitudes = ((base.float() + 0.01 * torch.randn(2_000_000, generator=g)).bfloat16() - base).abs()
    for density in (0.1, 0.5, 0.9):
        cpu = magnitude_mask(magnitudes, density, "index")
        assert torch.equal(magnitude_mask(magnitudes.cuda(), density, "index").cpu(), cpu)
