"""The I/O commands through Typer's CliRunner: inspect, example, convert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import write_checkpoint
from mergekit_like.cli.main import app
from typer.testing import CliRunner

runner = CliRunner()


def test_inspect_json_lists_every_tensor_and_totals(example_models: list[Path]) -> None:
    result = runner.invoke(app, ["inspect", str(example_models[0]), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["num_tensors"] == len(data["tensors"]) == 39
    assert data["num_parameters"] == sum(t["numel"] for t in data["tensors"])
    assert data["total_bytes"] == 2 * data["num_parameters"]
    assert data["index"] == "model.safetensors.index.json" and len(data["shards"]) == 2
    assert data["largest_tensor"] in ("model.embed_tokens.weight", "lm_head.weight")


def test_inspect_table_shows_names_and_totals(example_models: list[Path]) -> None:
    result = runner.invoke(app, ["inspect", str(example_models[0]), "--filter", "layers.0.mlp"])
    assert result.exit_code == 0, result.output
    assert "model.layers.0.mlp.up_p" in result.stdout and "layers.1" not in result.stdout
    assert "39 tensors" in result.stdout and "bfloat16" in result.stdout


def test_inspect_bad_path_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "error:" in result.output and "missing" in result.output
    assert "Traceback" not in result.output


def test_inspect_refuses_pickle_with_a_hint(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 2 and "--allow-pickle" in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path), "--allow-pickle", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["format"] == "pickle"


def test_example_then_convert_json(tmp_path: Path) -> None:
    result = runner.invoke(app, ["example", str(tmp_path / "ex"), "--finetunes", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["models"]) == 2
    result = runner.invoke(app, ["convert", str(tmp_path / "ex" / "base"), "-o", str(tmp_path / "c"),
                                 "--dtype", "fp32", "--shard-size", "200KB", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["num_tensors"] == 39 and len(summary["shards"]) > 2


def test_convert_refuses_existing_output_then_overwrites(tmp_path: Path) -> None:
    src = write_checkpoint(tmp_path / "src", {"w": torch.ones(2)})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    result = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2 and "--overwrite" in result.output
    result = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "out"), "-q", "--overwrite"])
    assert result.exit_code == 0 and result.stdout == ""


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("mergekit-like ")


def test_example_trajectory_is_averageable(tmp_path: Path) -> None:
    result = runner.invoke(app, ["example", str(tmp_path / "ex"), "--finetunes", "1", "--trajectory", "3", "--json"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["average", str(tmp_path / "ex" / "run"), "--method", "swa", "--list", "--json"])
    assert [c["step"] for c in json.loads(result.stdout)["checkpoints"]] == [100, 200, 300]


def test_an_error_line_keeps_its_brackets(tmp_path: Path) -> None:
    missing = tmp_path / "recipe[draft].yml"  # Rich would read "[draft]" as a style and drop it
    result = runner.invoke(app, ["merge", str(missing), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "recipe[draft].yml: recipe file not found" in result.output.replace("\n", "")


def test_markup_in_a_tensor_name_or_path_is_printed_as_plain_text(tmp_path: Path) -> None:
    # "[/]" closes no tag: as Rich markup it crashed the print after the work was done.
    model = write_checkpoint(tmp_path / "run[/]x", {"a[/]b": torch.ones(2), "[bold]c": torch.zeros(2)})
    for args in (["inspect", str(model)], ["verify", str(model)], ["inspect", str(model), "--totals"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
        assert "Traceback" not in result.output
    listing = runner.invoke(app, ["inspect", str(model)]).output
    assert "a[/]b" in listing and "[bold]c" in listing


def test_convert_takes_its_output_as_the_help_example_writes_it(tmp_path: Path) -> None:
    from mergekit_like.cli.convert_cmd import EXAMPLE

    source = write_checkpoint(tmp_path / "src", {"w": torch.ones(3)})
    words = EXAMPLE.removeprefix("Example: mergekit-like ").split()
    assert words[:3] == ["convert", "./pytorch-model", "./model-st"]  # positional output, as in --help
    result = runner.invoke(app, ["convert", str(source), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()
    both = runner.invoke(app, ["convert", str(source), str(tmp_path / "a"), "-o", str(tmp_path / "b")])
    assert both.exit_code == 2 and "two outputs given" in both.output


def test_ctrl_c_while_the_commands_are_imported_is_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    from mergekit_like.cli import entry

    class InterruptedImport:  # Ctrl-C arrives while torch (imported by the commands) loads
        def find_spec(self, name: str, path: object = None, target: object = None) -> None:
            if name == "mergekit_like.cli.main":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "mergekit_like.cli.main")
    monkeypatch.setattr(sys, "meta_path", [InterruptedImport(), *sys.meta_path])
    with pytest.raises(SystemExit) as exited:
        entry.main()
    assert exited.value.code == 130
    assert capsys.readouterr().err == "interrupted; nothing was written\n"


@pytest.mark.parametrize("delay", [0.2, 0.6, 1.0, 1.4])
def test_ctrl_c_at_any_point_of_start_up_never_prints_a_traceback(delay: float) -> None:
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-c", "from mergekit_like.cli.entry import main; main()", "--help"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert "Traceback" not in err and "Error" not in err, err
    # On a machine that starts faster than the delay, the help is simply done.
    assert (process.returncode == 130 and err == "interrupted; nothing was written\n") or (
        process.returncode == 0 and "Usage" in out), (process.returncode, err)


def test_piped_inspect_and_verify_never_wrap_a_tensor_name(tmp_path: Path) -> None:
    long_name = "model.layers.0." + "very_long_module_name." * 8 + "weight"  # far past 80 columns
    model = write_checkpoint(tmp_path / ("run-" + "x" * 90), {long_name: torch.ones(10), "b": torch.zeros(3)})
    listing = runner.invoke(app, ["inspect", str(model)])  # CliRunner's output is not a terminal
    assert listing.exit_code == 0, listing.output
    assert f"{long_name}\t10\tfloat32\t10\t40" in listing.stdout.splitlines()
    assert f"  largest tensor: {long_name} (40 B)" in listing.stdout.splitlines()
    verdict = runner.invoke(app, ["verify", str(model)]).stdout.splitlines()
    assert any(line.startswith(f"{model}: OK") for line in verdict), verdict


def test_terminal_escapes_in_tensor_names_are_printed_escaped(tmp_path: Path) -> None:
    # ESC sequences (a colour, an OSC title) in a name from a file must not reach the terminal raw.
    name = "w\x1b[31mred\x1b]0;title\x07\nnext"
    model = write_checkpoint(tmp_path / "m", {name: torch.ones(2)})
    for args in (["inspect", str(model)], ["inspect", str(model), "--totals"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.output and "\x07" not in result.output
    assert "w\\x1b[31mred\\x1b]0;title\\x07\\nnext" in runner.invoke(app, ["inspect", str(model)]).stdout
