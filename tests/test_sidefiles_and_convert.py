from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import write_checkpoint

from mergekit_like.io import convert_checkpoint, open_checkpoint


def test_convert_recasts_floats_only_and_copies_side_files(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(4, 4), "ids": torch.arange(4), "mask": torch.tensor([True, False])}
    src = write_checkpoint(tmp_path / "src", tensors, config={"model_type": "llama", "torch_dtype": "float32"})
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text("{}")
    (src / "optimizer.pt").write_bytes(b"not copied")
    written = convert_checkpoint(src, tmp_path / "out", dtype=torch.bfloat16, max_shard_size=40)
    assert len(written.shards) > 1 and written.index == "model.safetensors.index.json"
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    assert not (out / "optimizer.pt").exists()
    with open_checkpoint(out) as ckpt:
        assert torch.equal(ckpt.read("w"), tensors["w"].to(torch.bfloat16))
        assert torch.equal(ckpt.read("ids"), tensors["ids"])
        assert torch.equal(ckpt.read("mask"), tensors["mask"])


def test_convert_turns_a_pickle_into_safetensors(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    state = {"w": torch.randn(3, 2)}
    torch.save(state, tmp_path / "src" / "pytorch_model.bin")
    convert_checkpoint(tmp_path / "src", tmp_path / "out", allow_pickle=True)
    with open_checkpoint(tmp_path / "out") as ckpt:
        assert torch.equal(ckpt.read("w"), state["w"])


def test_new_transformers_dtype_key_is_updated(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "src", {"w": torch.ones(2)}, config={"dtype": "float32"})
    convert_checkpoint(src, tmp_path / "out", dtype=torch.float16)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "float16" and "torch_dtype" not in config


def test_non_hugging_face_config_gains_no_keys(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "src", {"w": torch.ones(2)}, config={"d_model": 8})
    convert_checkpoint(src, tmp_path / "out", dtype=torch.float16)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"d_model": 8}
