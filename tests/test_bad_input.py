"""Every malformed input is refused with an error that names the file and the tensor."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import write_checkpoint, write_raw_safetensors

from mergekit_like.errors import (
    CheckpointNotFoundError,
    InvalidCheckpointError,
    UnsafeCheckpointError,
    UnsupportedDtypeError,
)
from mergekit_like.io import open_checkpoint

F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def sharded(tmp_path: Path) -> Path:
    tensors = {f"w{i}": torch.full((4,), float(i)) for i in range(4)}
    return write_checkpoint(tmp_path / "ckpt", tensors, max_shard_size=32)


def rewrite_index(directory: Path, edit) -> Path:
    path = directory / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))
    return path


def test_missing_index_and_no_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError, match=str(tmp_path)):
        open_checkpoint(tmp_path)


def test_index_pointing_at_a_missing_shard(tmp_path: Path) -> None:
    directory = sharded(tmp_path)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError) as info:
        open_checkpoint(directory)
    message = str(info.value)
    assert "model.safetensors.index.json" in message and "model-00002-of-00002.safetensors" in message
    assert "tensor 'w" in message


@pytest.mark.parametrize("shard", ["../evil.safetensors", "/etc/passwd.safetensors", "sub/x.safetensors", ".."])
def test_path_traversal_in_weight_map(tmp_path: Path, shard: str) -> None:
    directory = sharded(tmp_path)
    rewrite_index(directory, lambda ix: ix["weight_map"].__setitem__("w0", shard))
    with pytest.raises(UnsafeCheckpointError, match=r"tensor 'w0'.*plain file name|absolute"):
        open_checkpoint(directory)


def test_shard_with_another_extension_in_index(tmp_path: Path) -> None:
    directory = sharded(tmp_path)
    (directory / "weights.bin").write_bytes(b"x")
    rewrite_index(directory, lambda ix: ix["weight_map"].__setitem__("w1", "weights.bin"))
    with pytest.raises(InvalidCheckpointError, match=r"tensor 'w1'.*weights.bin.*\.safetensors"):
        open_checkpoint(directory)


def test_index_that_is_not_json_or_lacks_weight_map(tmp_path: Path) -> None:
    directory = sharded(tmp_path)
    index = directory / "model.safetensors.index.json"
    index.write_text("{not json")
    with pytest.raises(InvalidCheckpointError, match="index.json.*not valid JSON"):
        open_checkpoint(directory)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(InvalidCheckpointError, match="weight_map"):
        open_checkpoint(directory)


def test_index_names_a_tensor_its_shard_lacks(tmp_path: Path) -> None:
    directory = sharded(tmp_path)
    rewrite_index(directory, lambda ix: ix["weight_map"].__setitem__("ghost", "model-00001-of-00002.safetensors"))
    with pytest.raises(InvalidCheckpointError, match=r"tensor 'ghost'.*model-00001-of-00002.safetensors"):
        open_checkpoint(directory)


def test_tensor_in_two_shards(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    directory.mkdir()
    write_raw_safetensors(directory / "a.safetensors", {"dup": F32_2}, b"\0" * 8)
    write_raw_safetensors(directory / "b.safetensors", {"dup": F32_2}, b"\0" * 8)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"dup": "a.safetensors", "other": "b.safetensors"}})
    )
    with pytest.raises(InvalidCheckpointError, match=r"tensor 'dup'.*two shards, a.safetensors and b.safetensors"):
        open_checkpoint(directory)


def test_truncated_shard(tmp_path: Path) -> None:
    path = write_raw_safetensors(tmp_path / "model.safetensors", {"w": F32_2}, b"\0" * 5)
    with pytest.raises(InvalidCheckpointError, match=r"model.safetensors: tensor 'w'.*truncated"):
        open_checkpoint(path)


def test_file_too_short_for_a_header(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(InvalidCheckpointError, match="too short"):
        open_checkpoint(path)


def test_header_length_larger_than_the_file(tmp_path: Path) -> None:
    path = write_raw_safetensors(tmp_path / "model.safetensors", {"w": F32_2}, b"\0" * 8, declared_length=10_000)
    with pytest.raises(InvalidCheckpointError, match=r"model.safetensors.*10000-byte header.*truncated"):
        open_checkpoint(path)


def test_gigantic_declared_header_is_refused_before_reading(tmp_path: Path) -> None:
    path = write_raw_safetensors(tmp_path / "model.safetensors", b"{}", declared_length=2**62)
    with pytest.raises(InvalidCheckpointError, match="over the 100000000-byte limit"):
        open_checkpoint(path)


def test_header_that_is_not_json(tmp_path: Path) -> None:
    path = write_raw_safetensors(tmp_path / "model.safetensors", b"{'w': nope}")
    with pytest.raises(InvalidCheckpointError, match="model.safetensors: header is not valid JSON"):
        open_checkpoint(path)


def test_header_that_is_not_utf8(tmp_path: Path) -> None:
    path = write_raw_safetensors(tmp_path / "model.safetensors", b'{"\xff": 1}')
    with pytest.raises(InvalidCheckpointError, match="not UTF-8"):
        open_checkpoint(path)


def test_duplicate_keys_in_header(tmp_path: Path) -> None:
    raw = b'{"w": ' + json.dumps(F32_2).encode() + b', "w": ' + json.dumps(F32_2).encode() + b"}"
    path = write_raw_safetensors(tmp_path / "model.safetensors", raw, b"\0" * 8)
    with pytest.raises(InvalidCheckpointError, match="tensor 'w': header lists this key twice"):
        open_checkpoint(path)


def test_overlapping_offsets(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    path = write_raw_safetensors(tmp_path / "model.safetensors", header, b"\0" * 12)
    with pytest.raises(InvalidCheckpointError, match="tensor 'b'.*overlaps tensor 'a'"):
        open_checkpoint(path)


def test_hole_between_tensors(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}
    path = write_raw_safetensors(tmp_path / "model.safetensors", header, b"\0" * 20)
    with pytest.raises(InvalidCheckpointError, match="tensor 'b'.*hole of 4 bytes"):
        open_checkpoint(path)


def test_trailing_bytes_after_the_data(tmp_path: Path) -> None:
    path = write_raw_safetensors(tmp_path / "model.safetensors", {"w": F32_2}, b"\0" * 12)
    with pytest.raises(InvalidCheckpointError, match="4 bytes follow"):
        open_checkpoint(path)


def test_dtype_and_shape_disagree_with_byte_count(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    path = write_raw_safetensors(tmp_path / "model.safetensors", header, b"\0" * 8)
    with pytest.raises(InvalidCheckpointError, match=r"tensor 'w'.*need 12 bytes but data_offsets span 8"):
        open_checkpoint(path)


@pytest.mark.parametrize("spec", [
    {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]},
    {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},
    {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]},
    {"shape": [2], "data_offsets": [0, 8]},
    [1, 2],
])
def test_malformed_entries(tmp_path: Path, spec: object) -> None:
    path = write_raw_safetensors(tmp_path / "model.safetensors", {"w": spec}, b"\0" * 8)
    with pytest.raises(InvalidCheckpointError, match="model.safetensors: tensor 'w'"):
        open_checkpoint(path)


def test_unknown_dtype(tmp_path: Path) -> None:
    header = {"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}
    path = write_raw_safetensors(tmp_path / "model.safetensors", header, b"\0" * 8)
    with pytest.raises(UnsupportedDtypeError, match="tensor 'w': unknown dtype 'Q7'"):
        open_checkpoint(path)


def test_pickle_is_refused_without_allow_pickle_and_read_with_it(tmp_path: Path) -> None:
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": torch.tensor(3)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model.bin: is a pickle.*--allow-pickle"):
        open_checkpoint(tmp_path)
    with open_checkpoint(tmp_path, allow_pickle=True) as ckpt:
        assert torch.equal(ckpt.read("w"), state["w"])
        assert torch.equal(ckpt.read("step"), state["step"])


def test_sharded_pickle_index(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.zeros(3)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        open_checkpoint(tmp_path)
    with open_checkpoint(tmp_path, allow_pickle=True) as ckpt:
        assert sorted(ckpt.names()) == ["a", "b"]
        assert torch.equal(ckpt.read("b"), torch.zeros(3))


def test_a_tensor_in_two_pickle_shards_is_an_error_even_where_the_index_picks_one(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"a": torch.zeros(2), "b": torch.zeros(3)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
    with pytest.raises(InvalidCheckpointError, match="stored in two shards, pytorch_model-00001-of-00002.bin and"):
        open_checkpoint(tmp_path, allow_pickle=True)


def test_pickle_that_weights_only_refuses_is_an_error_not_code_execution(tmp_path: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsafeCheckpointError, match="pytorch_model.bin"):
        open_checkpoint(tmp_path, allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def test_symlinked_shard_outside_the_directory_is_refused(tmp_path: Path) -> None:
    outside = write_checkpoint(tmp_path / "outside", {"w": torch.ones(2)})
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "model.safetensors").symlink_to(outside / "model.safetensors")
    with pytest.raises(UnsafeCheckpointError, match="outside the checkpoint directory"):
        open_checkpoint(directory)


def test_hub_cache_snapshot_links_into_blobs_are_accepted(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--name"
    blob = write_checkpoint(repo / "blobs" / "tmp", {"w": torch.ones(2)}) / "model.safetensors"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "deadbeef").write_bytes(blob.read_bytes())
    (snapshot / "model.safetensors").symlink_to("../../blobs/deadbeef")
    with open_checkpoint(snapshot) as ckpt:
        assert torch.equal(ckpt.read("w"), torch.ones(2))


def test_directory_with_several_unindexed_safetensors_is_ambiguous(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "a", {"w": torch.ones(1)})
    (tmp_path / "a" / "model.safetensors").rename(tmp_path / "a" / "one.safetensors")
    write_raw_safetensors(tmp_path / "a" / "two.safetensors", {})
    with pytest.raises(InvalidCheckpointError, match="several candidate checkpoints.*one.safetensors"):
        open_checkpoint(tmp_path / "a")


def test_other_safetensors_names_are_found(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, {"w": torch.ones(1)})
    (tmp_path / "model.safetensors").rename(tmp_path / "adapter_model.safetensors")
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.names() == ["w"]


def test_unknown_tensor_name_is_a_clear_error(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, {"w": torch.ones(1)})
    with open_checkpoint(tmp_path) as ckpt, pytest.raises(CheckpointNotFoundError, match="tensor 'nope'"):
        ckpt.read("nope")


def test_sharded_checkpoint_without_its_index_asks_for_one(tmp_path: Path) -> None:
    directory = sharded(tmp_path)
    (directory / "model.safetensors.index.json").unlink()
    with pytest.raises(InvalidCheckpointError) as info:
        open_checkpoint(directory)
    message = str(info.value)
    assert message.startswith(f"{directory}: holds several candidate checkpoints")
    assert "model-00001-of-00002.safetensors" in message and "add an index" in message


def test_indexed_shard_that_links_outside_the_directory_is_refused(tmp_path: Path) -> None:
    directory = sharded(tmp_path)
    shard = directory / "model-00002-of-00002.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)  # a valid shard, but not inside the checkpoint
    shard.symlink_to(outside)
    with pytest.raises(UnsafeCheckpointError, match=r"index.json: tensor 'w\d'.*model-00002-of-00002.safetensors.*"
                                                    r"outside the checkpoint directory"):
        open_checkpoint(directory)


def test_convert_with_a_config_nested_too_deeply_is_a_one_line_error(tmp_path: Path) -> None:
    from mergekit_like.cli.main import app
    from typer.testing import CliRunner

    source = write_checkpoint(tmp_path / "src", {"w": torch.ones(2)})
    (source / "config.json").write_text("[" * 100_000)
    result = CliRunner().invoke(app, ["convert", str(source), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2, result.output
    assert f"{source / 'config.json'}: config is nested too deeply" in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
