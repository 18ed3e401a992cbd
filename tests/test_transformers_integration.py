"""Checkpoints saved by transformers are read exactly (skipped without transformers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from mergekit_like.cli.main import app  # noqa: E402

from mergekit_like.io import open_checkpoint  # noqa: E402

pytestmark = pytest.mark.integration


def tiny_llama() -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16)


def test_sharded_save_pretrained_is_read_exactly_and_inspected(tmp_path: Path) -> None:
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").exists()
    state = model.state_dict()
    with open_checkpoint(tmp_path / "m") as ckpt:
        assert len(ckpt.files) > 1
        for name in ckpt.names():
            assert torch.equal(ckpt.read(name), state[name]), name
        assert set(ckpt.names()) <= set(state)
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "m"), "--totals"])
    assert result.exit_code == 0 and "shard(s)" in result.stdout


def test_our_output_loads_in_transformers(tmp_path: Path) -> None:
    from mergekit_like.io import convert_checkpoint

    model = tiny_llama()
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    convert_checkpoint(tmp_path / "m", tmp_path / "c", dtype=torch.float32, max_shard_size=30_000)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert loaded.dtype == torch.float32
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = model.float()(ids).logits
        actual = loaded(ids).logits
    torch.testing.assert_close(actual, expected)


def test_merged_checkpoint_loads_and_gives_the_in_memory_merges_logits(tmp_path: Path) -> None:
    from mergekit_like.methods import get_method

    base = tiny_llama().float()
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    finetunes = []
    for seed in (1, 2):
        model = tiny_llama().float()
        model.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        model.save_pretrained(tmp_path / f"ft{seed}", max_shard_size="20KB")
        finetunes.append(model)
    result = CliRunner().invoke(app, [
        "merge", "--method", "ties", "--base", str(tmp_path / "base"), str(tmp_path / "ft1"),
        str(tmp_path / "ft2"), "-p", "density=0.4", "-p", "weight=0.7,0.3", "-o", str(tmp_path / "merged"), "-q",
    ])
    assert result.exit_code == 0, result.output
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ties = get_method("ties")
    expected_state = {
        name: ties([ft.state_dict()[name] for ft in finetunes], base=tensor, weight=[0.7, 0.3], density=[0.4, 0.4])
        for name, tensor in base.state_dict().items()
    }
    reference = tiny_llama().float()
    reference.load_state_dict(expected_state)
    ids = torch.tensor([[5, 17, 3, 99, 42]])
    with torch.no_grad():
        for name, tensor in expected_state.items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits)
