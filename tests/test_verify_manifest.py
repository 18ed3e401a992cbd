"""`verify` against the manifest: every file an output holds is the tool's, unchanged, and nothing was added."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import write_checkpoint
from mergekit_like.cli.main import app
from safetensors.torch import save_file
from typer.testing import CliRunner
from typer.testing import Result as CliResult

from mergekit_like import card
from mergekit_like.io import verify as verify_module
from mergekit_like.io.checksums import CHECKSUMS, MAX_MANIFEST_BYTES, read_checksums
from mergekit_like.io.verify import verify_checkpoint

runner = CliRunner()
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes (POSIX)")
DEADLINE_S = 20.0
SIDE_FILES = {
    "generation_config.json": '{"do_sample": false}\n',
    "tokenizer.json": '{"version": "1.0"}\n',
    "tokenizer_config.json": '{"model_max_length": 16}\n',
}


def tiny_model(directory: Path, seed: int) -> Path:
    """A Hugging Face style directory: model.safetensors, config.json and the side files a tokenizer brings."""
    directory.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(8, 8, generator=g), "b": torch.randn(8, generator=g)},
              str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for name, text in SIDE_FILES.items():
        (directory / name).write_text(text)
    return directory


def invoke(args: list[str]) -> CliResult:
    """Runs the CLI in a thread and fails the test if it has not finished after DEADLINE_S (a FIFO read blocks)."""
    outcome: dict[str, CliResult] = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", runner.invoke(app, args)), daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    if thread.is_alive():
        pytest.fail(f"mergekit-like {' '.join(args)} still running after {DEADLINE_S} s")
    return outcome["result"]


def verify(directory: Path, *options: str) -> CliResult:
    return invoke(["verify", str(directory), *options])


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One output of `merge`, made once; each test tampers with a copy."""
    root = tmp_path_factory.mktemp("merged")
    a, b = tiny_model(root / "a", 0), tiny_model(root / "b", 1)
    result = runner.invoke(app, ["merge", "--method", "linear", str(a), str(b), "-p", "weight=1,1",
                                 "-o", str(root / "out"), "-q"])
    assert result.exit_code == 0, result.output
    return root / "out"


@pytest.fixture
def output(merged: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(merged, copy)
    return copy


def flip_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # in the last tensor's data: the header stays valid, the tensors still read
    path.write_bytes(bytes(data))


def failed_naming(result: CliResult, *names: str) -> bool:
    return result.exit_code == 1 and all(name in result.output for name in names)


# -- what the manifest covers --------------------------------------------------------


def test_the_manifest_lists_every_file_of_the_output(output: Path) -> None:
    manifest = read_checksums(output)
    assert manifest is not None
    on_disk = {p.name for p in output.iterdir()} - {CHECKSUMS}
    assert set(manifest) == on_disk
    assert {"model.safetensors", "config.json", "README.md", "merge_recipe.yml", *SIDE_FILES} <= on_disk


def test_a_clean_output_verifies(output: Path) -> None:
    result = verify(output, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["checksums"] == "ok" and report["tensors"] == 2
    assert report["unexpected"] == [] and report["tool_output"] is True


# -- a changed or removed manifest ---------------------------------------------------


def test_a_deleted_manifest_and_a_flipped_byte_fail(output: Path) -> None:
    (output / CHECKSUMS).unlink()
    flip_data_byte(output / "model.safetensors")
    result = verify(output)
    assert failed_naming(result, CHECKSUMS, "missing", "--no-strict"), result.output


def test_a_deleted_manifest_is_unverifiable_without_strict(output: Path) -> None:
    (output / CHECKSUMS).unlink()
    assert verify(output, "--strict").exit_code == 1
    result = verify(output, "--no-strict")
    assert result.exit_code == 0, result.output
    assert "unverifiable (no manifest)" in result.stdout
    report = json.loads(verify(output, "--no-strict", "--json").stdout)
    assert report["ok"] and report["checksums"] == "absent" and report["tensors"] == 2


def _directory(path: Path) -> None:
    path.mkdir()


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _link_to_dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


@pytest.mark.parametrize("replace", [
    _directory, pytest.param(_fifo, marks=needs_fifo), _link_to_dev_zero,
], ids=["directory", "fifo", "link-to-dev-zero"])
def test_a_manifest_that_is_not_a_regular_file_fails_without_blocking(output: Path,
                                                                      replace: Callable[[Path], None]) -> None:
    manifest = output / CHECKSUMS
    manifest.unlink()
    replace(manifest)
    for options in ((), ("--no-strict",)):
        result = verify(output, *options)
        assert failed_naming(result, CHECKSUMS, "not a regular file"), result.output
        problems = [line for line in result.output.splitlines() if line.startswith("problem:")]
        assert len(problems) == 1, result.output


def test_a_malformed_manifest_fails(output: Path) -> None:
    (output / CHECKSUMS).write_text("not a digest line\n")
    assert failed_naming(verify(output), CHECKSUMS, "line 1")


def test_a_manifest_larger_than_any_is_refused_unread(output: Path) -> None:
    with open(output / CHECKSUMS, "r+b") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: no disk used
    assert failed_naming(verify(output), CHECKSUMS, "larger than any manifest")


# -- files added -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model-00002-of-00002.safetensors", "pytorch_model.bin", "evil.py"])
def test_an_added_file_fails_and_is_named(output: Path, name: str) -> None:
    source = output / "model.safetensors"
    if name.endswith(".safetensors"):
        shutil.copyfile(source, output / name)
    else:
        (output / name).write_bytes(b"import os\n")
    result = verify(output, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["unexpected"] == [name]
    assert any(name in p and "not written by mergekit-like" in p for p in report["problems"]), report["problems"]


def test_an_added_folder_fails(output: Path) -> None:
    (output / "extra").mkdir()
    assert failed_naming(verify(output), "extra", "not written by mergekit-like")


def test_what_git_and_the_hub_add_to_a_repository_is_not_a_change(output: Path) -> None:
    (output / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (output / ".cache" / "huggingface").mkdir(parents=True)
    result = verify(output)
    assert result.exit_code == 0, result.output


# -- files changed ---------------------------------------------------------------------


def _add_auto_map(output: Path) -> None:
    config = json.loads((output / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (output / "config.json").write_text(json.dumps(config))


def _append(name: str) -> Callable[[Path], None]:
    def append(output: Path) -> None:
        with open(output / name, "a", encoding="utf-8") as f:
            f.write("\nadded later\n")
    return append


@pytest.mark.parametrize(("change", "name"), [
    (_add_auto_map, "config.json"),
    (_append("README.md"), "README.md"),
    (_append("merge_recipe.yml"), "merge_recipe.yml"),
    (_append("tokenizer_config.json"), "tokenizer_config.json"),
    (lambda out: flip_data_byte(out / "model.safetensors"), "model.safetensors"),
], ids=["config-auto-map", "readme", "recipe", "tokenizer", "weights"])
def test_a_changed_file_fails_and_is_named(output: Path, change: Callable[[Path], None], name: str) -> None:
    change(output)
    assert failed_naming(verify(output), name, "sha256 differs")


def test_a_listed_file_removed_fails(output: Path) -> None:
    (output / "generation_config.json").unlink()
    assert failed_naming(verify(output), "generation_config.json", "missing")


# -- checkpoints this tool did not write -------------------------------------------------


def test_verify_knows_the_files_the_card_module_writes() -> None:
    assert (verify_module.RECIPE_FILE, verify_module.CARD_FILE) == (card.RECIPE_FILE, card.CARD_FILE)


def test_a_foreign_checkpoint_is_checked_for_readability_only(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "downloaded", 0)
    result = verify(model)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{model}: OK") and "checksums absent" in result.stdout
    assert failed_naming(verify(model, "--strict"), CHECKSUMS)


def test_an_extracted_adapter_verifies_and_fails_without_its_manifest(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.down_proj.weight": torch.randn(16, 16, generator=g)}
    changed = {k: v + 0.05 * torch.randn(16, 2, generator=g) @ torch.randn(2, 16, generator=g) for k, v in base.items()}
    write_checkpoint(tmp_path / "base", base, config={"model_type": "llama"})
    write_checkpoint(tmp_path / "ft", changed, config={"model_type": "llama"})
    result = runner.invoke(app, ["extract-lora", str(tmp_path / "ft"), "--base", str(tmp_path / "base"),
                                 "--rank", "2", "-o", str(tmp_path / "adapter"), "-q"])
    assert result.exit_code == 0, result.output
    assert verify(tmp_path / "adapter" / "adapter_model.safetensors").exit_code == 0
    assert verify(tmp_path / "adapter").exit_code == 0
    (tmp_path / "adapter" / CHECKSUMS).unlink()  # an output of this tool (its card says so) without its manifest
    assert verify(tmp_path / "adapter").exit_code != 0


# -- every command's output verifies -------------------------------------------------------


def _assert_verifies(directory: Path) -> None:
    manifest = read_checksums(directory)
    assert manifest is not None and set(manifest) == {p.name for p in directory.iterdir()} - {CHECKSUMS}
    report = verify_checkpoint(directory)
    assert report.ok and report.checksums == "ok", report.problems


def test_a_merge_sweep_writes_a_complete_manifest_in_each_output(tmp_path: Path) -> None:
    a, b = tiny_model(tmp_path / "a", 0), tiny_model(tmp_path / "b", 1)
    result = runner.invoke(app, ["merge", "--method", "wise_ft", "--base", str(a), str(b), "-p", "alpha=0.3,0.6",
                                 "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    outputs = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    assert len(outputs) == 2
    for directory in outputs:
        _assert_verifies(directory)


def test_average_output_verifies(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step, value in ((1, 1.0), (2, 2.0)):
        write_checkpoint(run / f"checkpoint-{step}", {"w": torch.full((4,), value)}, config={"model_type": "x"})
        (run / f"checkpoint-{step}" / "tokenizer.json").write_text("{}\n")
    result = runner.invoke(app, ["average", str(run), "--method", "swa", "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    _assert_verifies(tmp_path / "out")
    assert "README.md" in (read_checksums(tmp_path / "out") or {})


def test_soup_output_verifies(tmp_path: Path) -> None:
    models = [str(tiny_model(tmp_path / f"m{i}", i)) for i in range(3)]
    result = runner.invoke(app, ["soup", *models, "-o", str(tmp_path / "soup"), "-q"])
    assert result.exit_code == 0, result.output
    _assert_verifies(tmp_path / "soup")


def test_convert_output_verifies(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "m", 0)
    result = runner.invoke(app, ["convert", str(model), "-o", str(tmp_path / "out"), "--dtype", "bfloat16", "-q"])
    assert result.exit_code == 0, result.output
    _assert_verifies(tmp_path / "out")
    assert set(SIDE_FILES) <= set(read_checksums(tmp_path / "out") or {})
