"""The writer's streamed sha256 digests and early writeback."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from mergekit_like.io import writer as writer_module
from mergekit_like.io.checksums import read_checksums
from mergekit_like.io.outputs import OutputSpec, WriteItem, write_checkpoints
from mergekit_like.io.sharding import TensorSpec
from mergekit_like.io.writer import ShardedWriter


def _specs() -> list[TensorSpec]:
    return [TensorSpec(f"t{i}", torch.float32, (64, 8)) for i in range(6)]


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {s.name: torch.randn(s.shape, generator=generator) for s in _specs()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_in_order_writes_give_each_shards_digest_without_reading_it_back(tmp_path: Path) -> None:
    tensors = _tensors()
    writer = ShardedWriter(tmp_path, _specs(), max_shard_size=5000)
    for name, value in tensors.items():
        writer.write(name, value[:32], row_start=0)
        writer.write(name, value[32:], row_start=32)
    result = writer.close()
    assert len(result.shards) > 1
    assert result.digests == {name: _sha256(tmp_path / name) for name in result.shards}


def test_out_of_order_writes_leave_the_digest_to_the_manifest(tmp_path: Path) -> None:
    tensors = _tensors()
    items = [WriteItem(0, name, value) for name, value in reversed(list(tensors.items()))]
    (written,) = write_checkpoints(tmp_path / "out", [OutputSpec()], _specs(), items)
    assert written.digests == {}
    manifest = read_checksums(tmp_path / "out")
    assert manifest is not None
    assert manifest == {name: _sha256(tmp_path / "out" / name) for name in manifest}
    assert set(written.shards) <= set(manifest)


def test_writeback_is_started_for_every_written_range(tmp_path: Path, monkeypatch) -> None:
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(writer_module, "start_writeback", lambda fd, offset, length: started.append((offset, length)))
    tensors = _tensors()
    with ShardedWriter(tmp_path, _specs()) as writer:
        for name, value in tensors.items():
            writer.write(name, value)
    assert sum(length for _, length in started) == sum(v.numel() * 4 for v in tensors.values())


def test_writeback_hint_never_fails(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    with open(path, "rb+") as f:
        writer_module.start_writeback(f.fileno(), 0, 4096)
        writer_module.start_writeback(f.fileno(), 1 << 40, 4096)  # beyond the end: still no error
