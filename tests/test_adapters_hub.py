"""An adapter on the Hub named alone: its base comes from its config, both are fetched and pinned.

Runs against tests/fake_hub.py with the real huggingface_hub client; peft makes the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_adapters import make_adapter, peft_merged, tiny_llama
from typer.testing import CliRunner

from cli.main import app

pytest_plugins = ["fake_hub"]
pytest.importorskip("peft", reason="peft is the reference for adapters (an integration dependency)")
pytestmark = pytest.mark.integration


def test_a_hub_adapter_brings_its_hub_base_and_both_are_pinned(fake_hub: object, tmp_path: Path) -> None:
    api = fake_hub.api("hf_writer")  # type: ignore[attr-defined]
    base = tiny_llama(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", seed=12, target_modules=["q_proj", "up_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "alice/base"}))
    (adapter / "README.md").unlink(missing_ok=True)  # peft's card names the local base, which the Hub refuses
    for repo, folder in (("alice/base", base), ("alice/adapter", adapter)):
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=folder)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["merge", "--method", "linear", "alice/adapter", "-p", "weight=1", "-o", str(out),
                                      "--token", "hf_writer", "--quiet"])
    assert result.exit_code == 0, result.output
    merged = load_file(out / "model.safetensors")
    expected = peft_merged(base, adapter)
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-6, atol=1e-7, msg=name)
    recipe = (out / "merge_recipe.yml").read_text()
    base_sha, adapter_sha = (api.model_info(r).sha for r in ("alice/base", "alice/adapter"))
    assert f"model: alice/base@{base_sha}+alice/adapter@{adapter_sha}" in recipe
    card = (out / "README.md").read_text()
    assert "(the adapter's base" in card and "(LoRA adapter" in card
