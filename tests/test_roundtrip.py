"""Writer -> reader round trips are exact, and safetensors' own loader agrees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import all_dtype_tensors, bitwise_equal, write_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_like.io import open_checkpoint
from mergekit_like.io.dtypes import SAFETENSORS_TO_TORCH


def test_every_dtype_and_edge_shape_round_trips_exactly(tmp_path: Path) -> None:
    tensors = all_dtype_tensors()
    write_checkpoint(tmp_path / "out", tensors)
    with open_checkpoint(tmp_path / "out") as ckpt:
        assert set(ckpt.names()) == set(tensors)
        for name, expected in tensors.items():
            assert bitwise_equal(ckpt.read(name), expected), name


def test_every_dtype_is_readable_by_safetensors_itself(tmp_path: Path) -> None:
    tensors = all_dtype_tensors()
    write_checkpoint(tmp_path / "out", tensors)
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    for name, expected in tensors.items():
        assert bitwise_equal(loaded[name], expected), name


def test_files_written_by_safetensors_are_read_exactly(tmp_path: Path) -> None:
    tensors = {k: v for k, v in all_dtype_tensors().items()}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.metadata == {"format": "pt"}
        for name, expected in tensors.items():
            assert bitwise_equal(ckpt.read(name), expected), name


def test_round_trip_across_shard_boundaries(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    tensors = {f"layer.{i}.w": torch.randn(10, 7, generator=g).to(torch.bfloat16) for i in range(9)}
    tensors["big"] = torch.randn(100, 10, generator=g)  # larger than a shard: gets its own
    write_checkpoint(tmp_path / "out", tensors, max_shard_size=400)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    with open_checkpoint(tmp_path / "out") as ckpt:
        assert len(ckpt.files) == len(files)
        for name, expected in tensors.items():
            assert torch.equal(ckpt.read(name), expected)


def test_tensors_may_be_written_in_any_order(tmp_path: Path) -> None:
    from mergekit_like.io import ShardedWriter, TensorSpec

    tensors = {f"t{i}": torch.full((i + 1,), float(i)) for i in range(6)}
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with ShardedWriter(tmp_path, specs, max_shard_size=12) as writer:
        for name in reversed(list(tensors)):
            writer.write(name, tensors[name])
    with open_checkpoint(tmp_path) as ckpt:
        for name, expected in tensors.items():
            assert torch.equal(ckpt.read(name), expected)


def test_read_into_a_supplied_buffer(tmp_path: Path) -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    write_checkpoint(tmp_path, {"t": t})
    buffer = torch.empty(1024, dtype=torch.uint8)
    with open_checkpoint(tmp_path) as ckpt:
        out = ckpt.read("t", out=buffer)
    assert torch.equal(out, t)
    assert out.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


_dtypes = st.sampled_from(sorted(SAFETENSORS_TO_TORCH.values(), key=str))
_shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
_names = st.text(alphabet="abcdefghij._0123456789", min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    specs=st.dictionaries(_names, st.tuples(_dtypes, _shapes), min_size=1, max_size=8),
    shard_size=st.integers(1, 200),
    seed=st.integers(0, 2**16),
)
def test_property_every_tensor_and_byte_survives_any_sharding(
    tmp_path_factory: pytest.TempPathFactory, specs: dict, shard_size: int, seed: int
) -> None:
    directory = tmp_path_factory.mktemp("prop")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (dtype, shape) in specs.items():
        nbytes = int(torch.tensor(shape).prod().item()) * torch.empty((), dtype=dtype).element_size()
        raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
        tensors[name] = (raw % 2 if dtype == torch.bool else raw).view(dtype).reshape(shape)
    write_checkpoint(directory, tensors, max_shard_size=shard_size)
    shard_files = sorted(directory.glob("*.safetensors"))
    index_path = directory / "model.safetensors.index.json"
    if len(shard_files) > 1:
        index = json.loads(index_path.read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert set(index["weight_map"].values()) == {p.name for p in shard_files}
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    else:
        assert not index_path.exists()
    seen = {}
    holder = {}
    for file in shard_files:
        with safe_open(file, "pt") as f:  # the reference loader validates offsets itself
            assert f.metadata() == {"format": "pt"}  # transformers refuses shards without it
            for key in f.keys():
                assert key not in seen
                seen[key] = f.get_tensor(key)
                holder[key] = file.name
    assert set(seen) == set(tensors)
    if len(shard_files) > 1:
        assert index["weight_map"] == holder  # the index points at the shard that holds each tensor
    with open_checkpoint(directory) as ckpt:
        for name, expected in tensors.items():
            assert bitwise_equal(seen[name], expected)
            assert bitwise_equal(ckpt.read(name), expected)


def test_an_index_with_another_name_and_its_shards_are_read(tmp_path: Path) -> None:
    """Diffusers saves ``diffusion_pytorch_model.safetensors.index.json`` and matching shards."""
    from mergekit_like.io import ShardedWriter, TensorSpec

    tensors = {f"unet.{i}.w": torch.full((8,), float(i)) for i in range(4)}
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with ShardedWriter(tmp_path, specs, max_shard_size=40, prefix="diffusion_pytorch_model") as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    assert index.is_file() and not (tmp_path / "model.safetensors.index.json").exists()
    shards = sorted(p.name for p in tmp_path.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) == 4
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.layout.index_path == index
        assert sorted(p.name for p in ckpt.files) == shards
        for name, expected in tensors.items():
            assert torch.equal(ckpt.read(name), expected)
