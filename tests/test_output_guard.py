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


def _three_models(root: Path) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    return [write_checkpoint(root / name, {"w": torch.randn(4, 4, generator=g)}) for name in ("base", "a", "b")]


def test_soup_average_merge_and_extract_lora_into_their_inputs_folder_are_refused(tmp_path: Path) -> None:
    models = tmp_path / "runs"
    base, a, b = _three_models(models)
    before = {p: (p / "model.safetensors").read_bytes() for p in (base, a, b)}
    _refused(["soup", str(a), str(b), "-o", str(models), "--overwrite"])
    _refused(["average", str(a), str(b), "--method", "swa", "-o", str(models), "--overwrite"])
    _refused(["merge", "--method", "linear", str(a), str(b), "-p", "weight=1", "-o", str(a), "--overwrite"])
    _refused(["extract-lora", str(a), "--base", str(base), "--rank", "2", "-o", str(models), "--overwrite"])
    assert {p: (p / "model.safetensors").read_bytes() for p in (base, a, b)} == before


def test_a_malformed_shard_size_is_a_usage_line_in_every_command(tmp_path: Path) -> None:
    _, a, b = _three_models(tmp_path)
    for args in (["soup", str(a), str(b)], ["convert", str(a)], ["average", str(a), str(b), "--method", "swa"],
                 ["merge", "--method", "linear", str(a), str(b), "-p", "weight=1"]):
        result = runner.invoke(app, [*args, "-o", str(tmp_path / "out"), "--shard-size", "bogus"])
        assert result.exit_code == 2 and "Traceback" not in result.output, (args, result.output)
        assert "shard" in result.output.lower() and not (tmp_path / "out").exists()
