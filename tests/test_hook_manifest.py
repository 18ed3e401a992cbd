"""`consolidate` reads shards/manifest.json defensively: a corrupt one is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import write_checkpoint
from mergekit_like.cli.main import app
from typer.testing import CliRunner

from mergekit_like.errors import InvalidCheckpointError
from mergekit_like.hook.shards import MAX_WORLD_SIZE, consolidate, read_manifest, shard_directory, write_manifest
from mergekit_like.io import open_checkpoint

runner = CliRunner()


def good() -> dict:
    return {"world_size": 1, "config": None,
            "tensors": {"w": {"shape": [2, 3], "dtype": "float32", "kind": "shard", "dim": 0},
                        "b": {"shape": [3], "dtype": "float32", "kind": "replicate"}}}


def changed(**changes: object) -> str:
    return json.dumps({**good(), **changes})


def tensor_changed(**changes: object) -> str:
    manifest = good()
    manifest["tensors"]["w"] = {**manifest["tensors"]["w"], **changes}
    return json.dumps(manifest)


CORRUPT = {
    "not json": ("{world_size: 1", "is not valid JSON"),
    "not utf-8": (b"\xff\xfe{}", "is not valid JSON"),
    "deep nesting": ("[" * 100_000, "is not valid JSON"),
    "huge integer": ('{"world_size": ' + "9" * 5000 + "}", "is not valid JSON"),
    "not an object": ("[1, 2]", "is not a JSON object"),
    "missing keys": ('{"world_size": 1}', "has no 'tensors', 'config'"),
    "world size a string": (changed(world_size="2"), "world_size '2' is not a number of ranks"),
    "world size a bool": (changed(world_size=True), "world_size True is not a number of ranks"),
    "world size zero": (changed(world_size=0), "world_size 0 is not a number of ranks"),
    "world size absurd": (changed(world_size=10**12), f"is not a number of ranks (1 to {MAX_WORLD_SIZE})"),
    "tensors a list": (changed(tensors=[]), "'tensors' is not an object"),
    "config a number": (changed(config=5), "'config' is neither an object nor null"),
    "placement not an object": (changed(tensors={"w": 3}), "tensor 'w': has no placement object"),
    "bad shape": (tensor_changed(shape=[2, -1]), "tensor 'w': shape [2, -1] is not a list of sizes"),
    "unknown dtype": (tensor_changed(dtype="__class__"), "tensor 'w': dtype '__class__' names no torch dtype"),
    "dtype not a string": (tensor_changed(dtype=7), "tensor 'w': dtype 7 names no torch dtype"),
    "unknown kind": (tensor_changed(kind="mirror"), "kind 'mirror' is neither 'shard' nor 'replicate'"),
    "dim out of range": (tensor_changed(dim=2), "shard dim 2 is not a dimension of shape [2, 3]"),
}


def out_dir_with(tmp_path: Path, text: str | bytes) -> Path:
    manifest = tmp_path / "avg" / "shards" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes(text if isinstance(text, bytes) else text.encode())
    return tmp_path / "avg"


@pytest.mark.parametrize("case", list(CORRUPT))
def test_a_corrupt_manifest_is_an_invalid_checkpoint_naming_the_file(tmp_path: Path, case: str) -> None:
    text, message = CORRUPT[case]
    out_dir = out_dir_with(tmp_path, text)
    with pytest.raises(InvalidCheckpointError, match=r"manifest\.json") as info:
        read_manifest(out_dir / "shards" / "manifest.json")
    assert message in str(info.value)
    result = runner.invoke(app, ["consolidate", str(out_dir), "--average", "ema_0.5", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_manifest_of_an_unsharded_model_consolidates_its_one_rank(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    write_manifest(tmp_path / "avg", model, {"model_type": "x"})
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    write_checkpoint(shard_directory(tmp_path / "avg", 0) / "ema_0.5" / "latest", state)
    written = consolidate(tmp_path / "avg", "ema_0.5", tmp_path / "out")
    with open_checkpoint(written.directory) as ckpt:
        assert all(torch.equal(ckpt.read(n), t) for n, t in state.items())
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"model_type": "x"}


def test_shards_of_different_steps_are_refused_unless_a_step_every_rank_saved_is_named(tmp_path: Path) -> None:
    out_dir = out_dir_with(tmp_path, changed(world_size=2))
    halves = {0: torch.arange(3.0).reshape(1, 3), 1: torch.arange(3.0, 6.0).reshape(1, 3)}
    for rank, saved in ((0, (2,)), (1, (2, 3))):  # rank 1 saved one step more
        average = shard_directory(out_dir, rank) / "ema_0.5"
        for step in saved:
            write_checkpoint(average / f"step_{step}", {"w": halves[rank] * step, "b": torch.ones(3)})
        (average / "latest").symlink_to(f"step_{saved[-1]}")
    result = runner.invoke(app, ["consolidate", str(out_dir), "--average", "ema_0.5", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "different steps (rank 0 step_2, rank 1 step_3)" in result.output and "--step N" in result.output
    assert not (tmp_path / "o").exists()
    written = consolidate(out_dir, "ema_0.5", tmp_path / "o", step=2)
    with open_checkpoint(written.directory) as ckpt:
        assert torch.equal(ckpt.read("w"), torch.arange(6.0).reshape(2, 3) * 2)


def test_a_manifest_for_an_out_dtype_records_it_for_the_tensors_and_the_config(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    write_manifest(tmp_path / "avg", model, {"model_type": "x", "torch_dtype": "bfloat16"}, torch.float32)
    manifest = read_manifest(tmp_path / "avg" / "shards" / "manifest.json")
    assert {t.dtype for t in manifest.tensors.values()} == {torch.float32}
    assert manifest.config == {"model_type": "x", "torch_dtype": "float32"}
