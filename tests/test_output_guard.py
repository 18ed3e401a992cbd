"""No command that writes may replace its inputs: one guard (the output is not, and does not
contain, an input), shared through write_checkpoints by merge, soup, average, convert and
consolidate. Each case lost data before the guard covered it."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import write_checkpoint
from mergekit_like.cli.main import app
from typer.testing import CliRunner

from mergekit_like.hook.shards import shard_directory, write_manifest

runner = CliRunner()


def _refused(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "would replace input" in result.output and "Traceback" not in result.output
    return result.output


def test_convert_into_the_folder_that_holds_its_source_is_refused(tmp_path: Path) -> None:
    models = tmp_path / "ex2"
    source = write_checkpoint(models / "base", {"w": torch.ones(4)})
    neighbour = write_checkpoint(models / "finetune-1", {"w": torch.zeros(4)})
    _refused(["convert", str(source), "-o", str(models), "--overwrite"])
    assert (source / "model.safetensors").is_file() and (neighbour / "model.safetensors").is_file()


def test_convert_onto_its_own_source_is_refused(tmp_path: Path) -> None:
    source = write_checkpoint(tmp_path / "src", {"w": torch.arange(4.0)})
    before = (source / "model.safetensors").read_bytes()
    _refused(["convert", str(source), "-o", str(source), "--overwrite", "--dtype", "float16"])
    assert (source / "model.safetensors").read_bytes() == before


def test_consolidate_into_the_run_that_holds_the_shards_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    write_manifest(run, model, None)
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    shard = write_checkpoint(shard_directory(run, 0) / "ema_0.5" / "latest", state)
    _refused(["consolidate", str(run), "--average", "ema_0.5", "-o", str(run), "--overwrite"])
    assert (shard / "model.safetensors").is_file() and (run / "shards" / "manifest.json").is_file()
