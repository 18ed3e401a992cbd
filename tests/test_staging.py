"""Staging: tensors go to the device and back in bounded chunks, and the bytes do not change.

The chunked path is what CUDA runs; ``staged=True`` runs it on the CPU too, so
these tests check the chunking (offsets, row blocks, large rows, copied tensors)
without a GPU. The CUDA-only parts (streams, events) are in test_gpu.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import base_and_two_recipe as _recipe
from helpers import split_merge_kwargs, write_checkpoint

from mergekit_like.io import open_checkpoint
from mergekit_like.io.reader import Checkpoint
from mergekit_like.io.writer import ShardedWriter
from mergekit_like.merge.engine import MergeOptions, planned_merge, run_merge
from mergekit_like.merge.staging import DeviceStaging, row_blocks

CPU = torch.device("cpu")
METHODS = [
    ("linear", ["weight=0.3,0.7"]),
    ("task_arithmetic", ["weight=0.5,1.0"]),
    ("ties", ["density=0.5", "weight=1.0,0.4"]),
    ("ties", ["density=0.5", "weight=1.0,0.4", "trim_scope=model"]),
    ("dare_ties", ["density=0.6", "weight=1.0"]),
    ("slerp", ["t=0.3"]),
    ("model_stock", []),
]


@pytest.mark.parametrize(("rows", "row_bytes", "chunk", "expected"), [
    ((0, 10), 4, 12, [(0, 3), (3, 6), (6, 9), (9, 10)]),
    ((5, 9), 4, 16, [(5, 9)]),
    ((0, 3), 100, 16, [(0, 1), (1, 2), (2, 3)]),  # a row over the chunk goes alone, whole
    ((2, 2), 4, 16, []),
    ((0, 4), 0, 16, [(0, 4)]),
])
def test_row_blocks_cover_the_rows_in_order_within_the_chunk(
    rows: tuple[int, int], row_bytes: int, chunk: int, expected: list[tuple[int, int]]
) -> None:
    assert row_blocks(rows, row_bytes, chunk) == expected


@pytest.fixture
def models(tmp_path: Path) -> list[Path]:
    g = torch.Generator().manual_seed(5)
    paths = []
    for name in ("base", "a", "b"):
        tensors = {f"model.layers.{i}.w": torch.randn(33, 16, generator=g).to(torch.bfloat16) for i in range(3)}
        tensors["embed"] = torch.randn(70, 16, generator=g).to(torch.bfloat16)
        tensors["norm"] = torch.randn(16, generator=g).to(torch.bfloat16)
        tensors["wide"] = torch.randn(2, 200, generator=g).to(torch.bfloat16)  # rows over the chunk
        tensors["scale"] = torch.tensor(1.5, dtype=torch.bfloat16)
        tensors["empty"] = torch.zeros(0, 16, dtype=torch.bfloat16)
        tensors["steps"] = torch.arange(3)
        paths.append(write_checkpoint(tmp_path / name, tensors, max_shard_size=3000))
    return paths


def _merged(recipe, out: Path, **kwargs) -> dict[str, torch.Tensor]:
    options, run = split_merge_kwargs(kwargs)
    with planned_merge(recipe, options) as plan:
        run_merge(plan, out, **run)
    with open_checkpoint(out) as ckpt:
        return {n: ckpt.read(n) for n in ckpt.names()}


@pytest.mark.parametrize(("method", "params"), METHODS)
@pytest.mark.parametrize("pipeline", [True, False])
def test_staged_chunks_give_the_same_bytes(
    models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, params: list[str],
    pipeline: bool,
) -> None:
    import mergekit_like.merge.options as options_module

    recipe = _recipe(models, method, params)
    plain = _merged(recipe, tmp_path / "plain")
    staging = DeviceStaging(CPU, chunk_bytes=100, staged=True)
    # A small budget splits element-wise merges into row blocks (a quarter of the budget holds
    # 7 rows of each float32 input for linear's 2 models, 5 with a base); staging's 3-row
    # pieces of the output then start inside them.
    monkeypatch.setattr(options_module, "MIN_MEMORY_BUDGET", 1)
    staged = _merged(recipe, tmp_path / "staged", staging=staging, pipeline=pipeline, memory_budget=3840)
    assert plain.keys() == staged.keys()
    for name in plain:
        assert torch.equal(plain[name], staged[name]), name


def test_staged_reads_and_writes_hold_at_most_a_chunk_per_piece(
    models: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    writes: list[int] = []
    real_read, real_write = Checkpoint.read, ShardedWriter.write

    def read(self, name, **kwargs):
        tensor = real_read(self, name, **kwargs)
        reads.append(tensor.numel() * tensor.element_size())
        return tensor

    def write(self, name, tensor, **kwargs):
        writes.append(tensor.numel() * tensor.element_size())
        return real_write(self, name, tensor, **kwargs)

    monkeypatch.setattr(Checkpoint, "read", read)
    monkeypatch.setattr(ShardedWriter, "write", write)
    chunk = 128
    staging = DeviceStaging(CPU, chunk_bytes=chunk, staged=True)
    with planned_merge(_recipe(models, "ties", ["density=0.5", "weight=1.0,0.4"])) as plan:
        run_merge(plan, tmp_path / "out", staging=staging)
    wide_row = 200 * 2  # a bf16 row of "wide": over the chunk, so read and written alone
    assert reads and writes
    assert max(reads) == wide_row and max(writes) == wide_row
    assert sorted(set(reads))[-2] <= chunk and sorted(set(writes))[-2] <= chunk


def test_staged_pickles_give_the_same_bytes(models: list[Path], tmp_path: Path) -> None:
    for path in models:  # the same tensors, as pytorch_model.bin
        with open_checkpoint(path) as ckpt:
            torch.save({n: ckpt.read(n) for n in ckpt.names()}, path / "pytorch_model.bin")
        for file in path.glob("*.safetensors*"):
            file.unlink()
        (path / "model.safetensors.index.json").unlink(missing_ok=True)
    recipe = _recipe(models, "ties", ["density=0.5", "weight=1.0,0.4"])
    with planned_merge(recipe, MergeOptions(allow_pickle=True)) as plan:
        run_merge(plan, tmp_path / "plain")
    with planned_merge(recipe, MergeOptions(allow_pickle=True)) as plan:
        run_merge(plan, tmp_path / "staged", staging=DeviceStaging(CPU, chunk_bytes=100, staged=True))
    with open_checkpoint(tmp_path / "plain") as plain, open_checkpoint(tmp_path / "staged") as staged:
        assert all(torch.equal(plain.read(n), staged.read(n)) for n in plain.names())


def test_a_pickled_tensor_read_into_a_buffer_views_it(models: list[Path]) -> None:
    path = models[0]
    with open_checkpoint(path) as ckpt:
        tensors = {n: ckpt.read(n) for n in ckpt.names()}
    torch.save(tensors, path.parent / "pickled.bin")
    with open_checkpoint(path.parent / "pickled.bin", allow_pickle=True) as ckpt:
        buffer = torch.zeros(4096, dtype=torch.uint8)
        rows = ckpt.read("embed", rows=(2, 5), out=buffer)
        assert torch.equal(rows, tensors["embed"][2:5])
        assert rows.data_ptr() == buffer.data_ptr()
        with pytest.raises(ValueError, match="at least as large"):
            ckpt.read("embed", out=torch.zeros(8, dtype=torch.uint8))


def test_unstaged_cpu_reads_each_tensor_whole(models: list[Path]) -> None:
    staging = DeviceStaging(CPU)
    assert not staging.staged
    with open_checkpoint(models[0]) as ckpt:
        with staging.copying():
            embed = staging.read(ckpt, "embed", rows=(3, 9))
        staging.accept([embed], staging.fence())
        assert torch.equal(embed, ckpt.read("embed")[3:9])
        assert list(staging.download(embed)) == [(None, embed)]


def test_staging_refuses_a_chunk_of_no_bytes() -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        DeviceStaging(CPU, chunk_bytes=0)


def test_staging_for_another_device_than_the_merge_is_refused(models: list[Path], tmp_path: Path) -> None:
    class Elsewhere(DeviceStaging):
        def __init__(self) -> None:
            super().__init__(CPU)
            self.device = torch.device("meta")

    with planned_merge(_recipe(models, "linear", ["weight=0.3,0.7"])) as plan:
        with pytest.raises(ValueError, match="staging moves tensors to meta"):
            run_merge(plan, tmp_path / "out", staging=Elsewhere())
    assert not (tmp_path / "out").exists()
