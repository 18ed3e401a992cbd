"""NaN and infinite values written by any command are counted and warned about, or refused with --check-finite."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_checkpoint
from mergekit_like.cli.main import app
from typer.testing import CliRunner

runner = CliRunner()


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """fp16 models whose task vectors overflow float16 when doubled, and one holding a NaN."""
    base = {"w": torch.zeros(4, 4, dtype=torch.float16), "b": torch.zeros(4, dtype=torch.float16)}
    big = {"w": torch.full((4, 4), 60000.0, dtype=torch.float16), "b": torch.ones(4, dtype=torch.float16)}
    nan = {"w": torch.ones(4, 4, dtype=torch.float16), "b": torch.tensor([float("nan"), 1, 1, 1]).half()}
    write_checkpoint(tmp_path / "base", base)
    write_checkpoint(tmp_path / "big", big)
    write_checkpoint(tmp_path / "nan", nan)
    big32 = {"w": torch.full((4, 4), 1e6), "b": torch.ones(4)}
    write_checkpoint(tmp_path / "big32", big32)
    return tmp_path


def one_line(output: str) -> str:
    return " ".join(output.split())


def test_an_overflowing_merge_ends_with_a_warning_naming_the_tensor(models: Path) -> None:
    out = models / "out"
    result = runner.invoke(app, ["merge", "--method", "task_arithmetic", "--base", str(models / "base"),
                                 str(models / "big"), "-p", "weight=2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    line = one_line(result.output)
    assert "warning:" in line and "16 NaN or infinite values written in 1 tensor(s): 'w' (16)" in line
    assert (out / "model.safetensors").is_file()


def test_check_finite_refuses_an_overflowing_merge_and_writes_nothing(models: Path) -> None:
    out = models / "out"
    result = runner.invoke(app, ["merge", "--method", "task_arithmetic", "--base", str(models / "base"),
                                 str(models / "big"), "-p", "weight=2", "-o", str(out), "--check-finite"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "tensor 'w'" in one_line(result.output) and "holds 16 NaN or infinite values" in one_line(result.output)
    assert not out.exists() and not list(models.glob(".out*"))


def test_convert_to_float16_of_large_values_warns_or_is_refused(models: Path) -> None:
    warned = runner.invoke(app, ["convert", str(models / "big32"), str(models / "c16"), "--dtype", "float16"])
    assert warned.exit_code == 0 and "'w' (16)" in one_line(warned.output)
    refused = runner.invoke(app, ["convert", str(models / "big32"), str(models / "r16"), "--dtype", "float16",
                                  "--check-finite"])
    assert refused.exit_code == 2 and not (models / "r16").exists()


def test_soup_and_average_of_a_nan_input_warn(models: Path) -> None:
    soup = runner.invoke(app, ["soup", str(models / "nan"), str(models / "big"), "-o", str(models / "soup")])
    assert soup.exit_code == 0 and "'b' (1)" in one_line(soup.output)
    refused = runner.invoke(app, ["soup", str(models / "nan"), str(models / "big"), "-o", str(models / "soup2"),
                                  "--check-finite"])
    assert refused.exit_code == 2 and not (models / "soup2").exists()
    average = runner.invoke(app, ["average", str(models / "nan"), str(models / "big"), "--method", "swa", "-o",
                                  str(models / "avg")])
    assert average.exit_code == 0 and "NaN or infinite values written" in one_line(average.output)


def test_a_finite_merge_prints_no_warning(models: Path) -> None:
    result = runner.invoke(app, ["merge", "--method", "task_arithmetic", "--base", str(models / "base"),
                                 str(models / "big"), "-p", "weight=0.5", "-o", str(models / "ok"), "--check-finite"])
    assert result.exit_code == 0 and "warning" not in result.output


def test_average_check_finite_refuses_an_output_that_overflows_its_dtype(models: Path) -> None:
    result = runner.invoke(app, ["average", str(models / "big32"), str(models / "big32"), "--method", "swa",
                                 "--out-dtype", "float16", "-o", str(models / "avg16"), "--check-finite"])
    assert result.exit_code == 2 and "holds 16 NaN or infinite values" in one_line(result.output)
    assert not (models / "avg16").exists()


def test_an_extracted_adapter_carries_a_manifest_that_verify_checks(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.down_proj.weight": torch.randn(8, 8, generator=g)}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}
    write_checkpoint(tmp_path / "base", base, config=config)
    write_checkpoint(tmp_path / "tuned", tuned, config=config)
    made = runner.invoke(app, ["extract-lora", str(tmp_path / "tuned"), "--base", str(tmp_path / "base"), "--rank",
                               "2", "-o", str(tmp_path / "adapter")])
    assert made.exit_code == 0, made.output
    assert (tmp_path / "adapter" / "checksums.sha256").is_file()
    assert runner.invoke(app, ["verify", str(tmp_path / "adapter")]).exit_code == 0
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert runner.invoke(app, ["verify", str(tmp_path / "adapter")]).exit_code != 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn])
def test_nonfinite_count_counts_nan_and_both_infinities(dtype: torch.dtype) -> None:
    from mergekit_like.io.values import nonfinite_count

    values = torch.linspace(-2, 2, 1000).to(dtype)
    assert nonfinite_count(values) == 0
    if dtype != torch.float8_e4m3fn:  # e4m3fn has no infinity
        values[[3, 500]] = torch.tensor([float("inf"), -float("inf")]).to(dtype)
    values[[7, 999]] = float("nan")
    assert nonfinite_count(values) == (2 if dtype == torch.float8_e4m3fn else 4)
    assert nonfinite_count(torch.empty(0, dtype=dtype)) == 0 and nonfinite_count(torch.arange(3)) == 0
