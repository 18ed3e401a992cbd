"""The CUDA path gives the CPU path's numbers (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import split_merge_kwargs

from mergekit_like.io import open_checkpoint
from mergekit_like.merge.engine import MergeOptions, planned_merge, run_merge
from mergekit_like.merge.recipe import recipe_from_cli

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method,params", [
    ("linear", ["weight=0.5,0.3,0.2"]),
    ("task_arithmetic", ["weight=1,0.6,0.3"]),
    ("ties", ["weight=1,0.6,0.3", "density=0.5"]),
    ("ties", ["weight=1,0.6,0.3", "density=0.5", "trim_ties=index"]),
    ("ties", ["weight=1,0.6,0.3", "density=0.5", "trim_ties=keep", "rescale=true"]),
    ("breadcrumbs_ties", ["weight=1,0.6,0.3", "density=0.6", "gamma=0.05"]),
    ("slerp", ["t=0.3"]),
    ("model_stock", []),
    ("sce", []),
])
def test_cuda_merge_matches_cpu(example_models_f32: list[Path], tmp_path: Path, method: str, params: list[str]) -> None:
    base, *fts = map(str, example_models_f32)
    models = [base, fts[0]] if method == "slerp" else fts
    recipe = recipe_from_cli(method, models, base=None if method == "linear" else base, params=params)
    outputs = {}
    for device in ("cpu", "cuda"):
        with planned_merge(recipe, MergeOptions(device=device)) as plan:
            run_merge(plan, tmp_path / device)
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


def _merged_on_cuda(recipe, out: Path, **kwargs) -> dict[str, torch.Tensor]:
    options, run = split_merge_kwargs({"device": "cuda", **kwargs})
    with planned_merge(recipe, options) as plan:
        run_merge(plan, out, **run)
    with open_checkpoint(out) as ckpt:
        return {n: ckpt.read(n) for n in ckpt.names()}


@pytest.mark.parametrize("method,params", [
    ("linear", ["weight=0.5,0.3,0.2"]),
    ("ties", ["weight=1,0.6,0.3", "density=0.5"]),
    ("dare_ties", ["weight=1,0.6,0.3", "density=0.5"]),
])
def test_cuda_chunks_streams_and_pipeline_do_not_change_the_bytes(
    example_models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, params: list[str]
) -> None:
    """Small staging chunks (many copies in flight on the copy stream), row blocks and the
    pipeline's overlap of reading with computing give exactly the bytes of the
    one-item-at-a-time run. The copies and the results are made late on purpose (the GPU
    sleeps first), so a missing wait on an event would compute on, or write, unfilled memory."""
    import mergekit_like.merge.options as options_module
    from mergekit_like.merge.staging import DeviceStaging

    class LateCopies(DeviceStaging):
        def read(self, checkpoint, name, rows=None):  # type: ignore[no-untyped-def]
            torch.cuda._sleep(10_000_000)  # on the copy stream: the copies that follow land late
            return super().read(checkpoint, name, rows)

        def download(self, tensor):  # type: ignore[no-untyped-def]
            torch.cuda._sleep(10_000_000)  # on the compute stream: the result is finished late
            return super().download(tensor)

    base, *fts = map(str, example_models)
    recipe = recipe_from_cli(method, fts, base=None if method == "linear" else base, params=params)
    sequential = _merged_on_cuda(recipe, tmp_path / "sequential", pipeline=False)
    monkeypatch.setattr(options_module, "MIN_MEMORY_BUDGET", 1)
    late = LateCopies(torch.device("cuda"), chunk_bytes=4096)
    # 64 KiB: element-wise merges of the larger tensors go in row blocks.
    pipelined = _merged_on_cuda(recipe, tmp_path / "pipelined", memory_budget=65536, staging=late)
    assert sequential.keys() == pipelined.keys()
    for name, expected in sequential.items():
        assert torch.equal(pipelined[name], expected), name


def test_cuda_merge_holds_a_few_tensors_on_the_device(example_models: list[Path], tmp_path: Path) -> None:
    base, *fts = map(str, example_models)
    recipe = recipe_from_cli("ties", fts, base=base, params=["weight=1,0.6,0.3", "density=0.5"])
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with planned_merge(recipe, MergeOptions(device="cuda")) as plan:
        largest = max(t.read_bytes for t in plan.tensors)
        result = run_merge(plan, tmp_path / "out")
        model_f32 = 2 * plan.read_bytes
    assert result.peak_gpu_bytes is not None
    peak = result.peak_gpu_bytes - before
    # Inputs of the item in compute and of the one read ahead (models as stored in bf16, the base
    # in float32), plus ties' temporaries (deltas, masks, a sort's indices); the bound is below
    # the inputs' size in float32, so holding the model would fail it.
    assert 12 * largest < model_f32
    assert peak <= 12 * largest, (peak, largest)


def test_dares_units_on_cuda_are_reproducible_and_fair() -> None:
    from mergekit_like.methods.task_vectors import DRAW_UNIT, bernoulli_mask

    cuda = torch.device("cuda")
    numel = 2 * DRAW_UNIT + DRAW_UNIT // 2
    mask = bernoulli_mask(numel, 0.3, 7, cuda)
    assert mask.device.type == "cuda" and torch.equal(mask, bernoulli_mask(numel, 0.3, 7, cuda))
    assert torch.equal(bernoulli_mask(DRAW_UNIT + 1, 0.3, 7, cuda), mask[:DRAW_UNIT + 1])  # units, not one stream
    assert abs(mask.float().mean().item() - 0.3) < 2e-3
