"""Shared test helpers: tolerances, raw safetensors files, tiny checkpoints."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from mergekit_like.io.sharding import TensorSpec
from mergekit_like.io.writer import ShardedWriter
from mergekit_like.merge.options import MergeOptions

# Per-dtype tolerances for comparing computed results (exact round trips use torch.equal).
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, **tol)


def write_raw_safetensors(path: Path, header: dict[str, Any] | bytes, data: bytes = b"",
                          declared_length: int | None = None) -> Path:
    """Writes a safetensors file byte by byte, however malformed the caller wants it."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if declared_length is None else declared_length
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    return path


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], max_shard_size: int = 10**9,
                     config: dict[str, Any] | None = None) -> Path:
    """Writes ``tensors`` with the project's writer (sharded if they exceed ``max_shard_size``)."""
    directory.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with ShardedWriter(directory, specs, max_shard_size=max_shard_size) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    """One tensor of every dtype this torch build can store in safetensors, plus edge shapes."""
    from mergekit_like.io.dtypes import SAFETENSORS_TO_TORCH

    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for code, dtype in SAFETENSORS_TO_TORCH.items():
        raw = torch.randint(0, 256, (3, 5, 8), dtype=torch.uint8, generator=g)
        size = torch.empty((), dtype=dtype).element_size()
        if dtype == torch.bool:
            tensor = raw[..., :1].squeeze(-1) % 2 == 1
        else:
            tensor = raw.reshape(3, 5, 8 // size, size).contiguous().view(dtype).reshape(3, 5, 8 // size)
        out[f"t.{code}"] = tensor
        out[f"scalar.{code}"] = tensor.reshape(-1)[0].clone().reshape(())
        out[f"empty.{code}"] = torch.empty((0, 4), dtype=dtype)
    return out


def quantised(shape: tuple[int, ...], seed: int, dtype: torch.dtype, levels: float = 64.0) -> torch.Tensor:
    """Values on a coarse grid: many magnitudes tie, so tie groups straddle the cut and the blocks."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * levels).round().div(levels * 8).to(dtype)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality, NaN payloads included (torch.equal treats NaN != NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def base_and_two_recipe(models: list[Path], method: str, params: list[str]) -> Any:
    """A recipe over (base, a, b): slerp from base to b, linear of a and b, the others a and b on base."""
    from mergekit_like.merge.recipe import recipe_from_cli

    base, a, b = map(str, models)
    if method == "slerp":
        return recipe_from_cli(method, [base, b], base=base, params=params)
    return recipe_from_cli(method, [a, b], base=None if method == "linear" else base, params=params)


# run_merge's own keywords; every other keyword of a test's merge is a MergeOptions field.
RUN_KEYWORDS = {"outputs", "overwrite", "progress", "staging"}


def split_merge_kwargs(kwargs: dict[str, Any]) -> tuple[MergeOptions, dict[str, Any]]:
    """A test's merge keywords as (the plan's options, run_merge's keywords)."""
    options = {k: v for k, v in kwargs.items() if k not in RUN_KEYWORDS and v is not None}
    return MergeOptions(**options), {k: v for k, v in kwargs.items() if k in RUN_KEYWORDS}


def merge_in_row_blocks(method_name: str, models: list[torch.Tensor], base: torch.Tensor, rows: int,
                        params: dict[str, Any], seed: int | None = None,
                        blocks: tuple[tuple[int, int], ...] | None = None) -> torch.Tensor:
    """The engine's route for a tensor merged in row blocks of ``rows`` rows (or the given ``blocks``):
    the method's tensor pass over the blocks, then the kernel per block. ``params`` are the kernel's,
    as the planner resolves them (defaults included where the pass reads them); ``seed`` seeds the
    tensor's generator."""
    from mergekit_like.methods import get_method

    method = get_method(method_name)
    tensor_pass = method.tensor_pass
    assert tensor_pass is not None and tensor_pass.blockwise(params, base.dtype, "cpu")

    def generator() -> torch.Generator | None:
        return torch.Generator().manual_seed(seed) if seed is not None else None

    if blocks is None:
        blocks = tuple((start, min(start + rows, base.shape[0])) for start in range(0, base.shape[0], rows))
    reduction = tensor_pass.start(params, base.numel(), base.device, None, generator())
    for pass_index in range(tensor_pass.passes(params, base.dtype)):
        for start, stop in blocks:
            reduction.observe(pass_index, [m[start:stop] for m in models], base[start:stop])
        reduction.end_pass(pass_index)
    extra = {"generator": generator()} if method.uses_generator else {}
    return torch.cat([method([m[a:b] for m in models], base=base[a:b], **params, **extra,
                             **{tensor_pass.keyword: reduction.block((a, b))}) for a, b in blocks])


def assert_row_block_merge_equals_whole(
    tensors: list[dict[str, torch.Tensor]], recipe_data: dict[str, Any], directory: Path, expected_passes: int | None,
    device: str = "cpu",
) -> None:
    """Writes base + models (``tensors``, the base first), merges ``recipe_data`` whole and then under a
    budget small enough to merge ``model.embed_tokens.weight`` in row blocks (the embedding needs a
    float32 compute dtype's 96 x 16 with three inputs), and checks the two outputs bit for bit.

    ``recipe_data`` gets ``base_model`` and ``models`` (weights 1.0, 0.7, ... for a method that weighs)
    filled in. Callers patch ``mergekit_like.merge.options.MIN_MEMORY_BUDGET`` down first.
    ``expected_passes``: the embedding's tensor passes, where the caller pins them; ``device``: where both merge.
    """
    from mergekit_like.io import open_checkpoint
    from mergekit_like.merge.engine import planned_merge, run_merge, tensor_pass_count
    from mergekit_like.merge.recipe import parse_recipe
    from mergekit_like.methods import get_method

    paths = [write_checkpoint(directory / f"model-{i}", t, config={"model_type": "llama"})
             for i, t in enumerate(tensors)]
    weighted = get_method(recipe_data["merge_method"]).spec("weight") is not None
    recipe = parse_recipe({**recipe_data, "base_model": str(paths[0]), "models": [
        {"model": str(p), "parameters": {"weight": round(1.0 - 0.3 * i, 2)} if weighted else {}}
        for i, p in enumerate(paths[1:])]})
    with planned_merge(recipe, MergeOptions(device=device)) as plan:
        assert all(t.chunks is None for t in plan.tensors) and plan.row_block_share == 0.0
        run_merge(plan, directory / "whole")
    with planned_merge(recipe, MergeOptions(memory_budget=3 * 4 * 8 * 16 * 4, device=device)) as plan:
        embedding = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
        assert embedding.chunks is not None and len(embedding.chunks) > 3
        assert expected_passes is None or tensor_pass_count(plan, embedding) == expected_passes
        # The allocator policy is chosen by the share of the reads that row blocks of the method take.
        blocked = sum(t.read_bytes for t in plan.tensors if t.chunks is not None)
        assert blocked >= embedding.read_bytes and plan.row_block_share == blocked / plan.read_bytes
        assert 0 < plan.row_block_share < 1
        run_merge(plan, directory / "blocks")
    with open_checkpoint(directory / "whole") as whole, open_checkpoint(directory / "blocks") as blocks:
        assert whole.names() == blocks.names()
        assert all(torch.equal(whole.read(n), blocks.read(n)) for n in whole.names())
