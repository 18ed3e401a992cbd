"""Pushing to and reading from the Hub, against the local stand-in (tests/fake_hub.py)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import write_checkpoint
from mergekit_like.cli.main import app
from mergekit_like.errors import HubError
from mergekit_like.hub import push, validate_for_push
from mergekit_like.io import open_checkpoint

pytest.register_assert_rewrite("fake_hub")
from fake_hub import FakeHub  # noqa: E402

pytest_plugins = ["fake_hub"]
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

runner = CliRunner()
TOKEN = "hf_writer"  # may write to alice/*
BIG_ROWS = 2_700  # 2,700 x 1,024 float32 = 11 MB: more than 10 MiB, so the shard goes through LFS


def models(tmp_path: Path) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    out = []
    for name in ("a", "b"):
        tensors = {"big": torch.randn(BIG_ROWS, 1024, generator=g), "small": torch.randn(8, generator=g)}
        path = write_checkpoint(tmp_path / name, tensors, config={"model_type": "llama"})
        (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# input\n")
        out.append(path)
    return out


def merged(tmp_path: Path, inputs: list[str], name: str = "merged", *extra: str) -> Path:
    result = runner.invoke(app, ["merge", "--method", "linear", *inputs, "-p", "weight=0.5,0.5",
                                 "-o", str(tmp_path / name), "-q", *extra])
    assert result.exit_code == 0, result.output
    return tmp_path / name


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_push_sends_every_file_byte_for_byte_in_one_commit(fake_hub: FakeHub, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = merged(tmp_path, [str(p) for p in models(tmp_path)])
    result = runner.invoke(app, ["push", str(out), "alice/merged", "--json"])
    assert result.exit_code == 0, result.output
    files = fake_hub.list_files("alice/merged")
    local = {p.name for p in out.iterdir()}
    assert local <= set(files)
    for name in local:
        assert sha256(fake_hub.read_file("alice/merged", name)) == sha256((out / name).read_bytes()), name
    assert files["model.safetensors"]["lfs"] is not None  # the 11 MB shard went through LFS
    assert [c["title"] for c in fake_hub.commits("alice/merged")][1:] == ["Upload merged with mergekit-like 0.1.0"]


def test_pushed_model_merges_by_repo_id_like_the_local_directory(fake_hub: FakeHub, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    a, b = models(tmp_path)
    push(a, "alice/model-a")
    local = merged(tmp_path, [str(a), str(b)], "local")
    remote = merged(tmp_path, ["alice/model-a", str(b)], "remote")
    assert (local / "model.safetensors").read_bytes() == (remote / "model.safetensors").read_bytes()
    card = (remote / "README.md").read_text()
    assert "base_model:\n- alice/model-a" in card and "commit " in card
    assert "license: apache-2.0" in card  # both inputs state it


def test_the_token_never_appears_in_output_logs_card_or_recipe(fake_hub: FakeHub, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    a, b = models(tmp_path)
    result = runner.invoke(app, ["merge", "--method", "linear", str(a), str(b), "-p", "weight=1,1",
                                 "-o", str(tmp_path / "m"), "--push-to-hub", "alice/m", "--token", TOKEN])
    assert result.exit_code == 0, result.output
    assert "shell history" in result.output  # the warning about --token
    texts = [result.output, caplog.text] + [p.read_text() for p in (tmp_path / "m").iterdir() if p.suffix != ".safetensors"]
    assert all(TOKEN not in text for text in texts)
    assert fake_hub.list_files("alice/m")


def test_interrupted_push_then_rerun_gives_a_complete_repo_and_one_commit(fake_hub: FakeHub, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = merged(tmp_path, [str(p) for p in models(tmp_path)])
    fake_hub.fail_next(endpoint="commit", status=500)
    failed = runner.invoke(app, ["push", str(out), "alice/resume"])
    assert failed.exit_code == 2 and "retry later" in failed.output.lower() and "Traceback" not in failed.output
    before = fake_hub.commit_count("alice/resume")
    again = runner.invoke(app, ["push", str(out), "alice/resume", "-q"])
    assert again.exit_code == 0, again.output
    assert fake_hub.commit_count("alice/resume") == before + 1
    assert {p.name for p in out.iterdir()} <= set(fake_hub.list_files("alice/resume"))
    runner.invoke(app, ["push", str(out), "alice/resume", "-q"])  # nothing changed: no empty commit
    assert fake_hub.commit_count("alice/resume") == before + 1


@pytest.mark.parametrize("token,repo,expected", [
    (None, "alice/x", "needs a valid token"),
    ("hf_reader", "alice/x", "may not write there"),
    (TOKEN, "alice/bad..name", "not a valid repo"),
])
def test_auth_and_name_errors_are_one_clear_line(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 token: str | None, repo: str, expected: str) -> None:
    out = merged(tmp_path, [str(p) for p in models(tmp_path)])
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    result = runner.invoke(app, ["push", str(out), repo])
    assert result.exit_code == 2 and expected in result.output, result.output
    assert "Traceback" not in result.output and (token is None or token not in result.output)


def test_missing_hub_input_is_a_clear_error(fake_hub: FakeHub, tmp_path: Path) -> None:
    result = runner.invoke(app, ["merge", "--method", "linear", "alice/nope", "alice/nada", "-p", "weight=1,1",
                                 "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "alice/nope: not found on the Hub" in result.output


def test_push_refuses_partial_and_temporary_directories(tmp_path: Path) -> None:
    plain = write_checkpoint(tmp_path / "plain", {"w": torch.ones(2)})
    assert any("no README.md" in p for p in validate_for_push(plain))
    temp = write_checkpoint(tmp_path / ".out.tmp-123-abcd", {"w": torch.ones(2)})
    assert any("temporary directory" in p for p in validate_for_push(temp))
    with pytest.raises(HubError, match="no README.md"):
        push(plain, "alice/x")


def test_a_card_the_hub_would_refuse_is_not_pushed(fake_hub: FakeHub, tmp_path: Path) -> None:
    out = merged(tmp_path, [str(p) for p in models(tmp_path)])
    (out / "README.md").write_text("---\nbase_model: [not a repo id!]\nbase_model_relation: blend\n---\n# x\n")
    problems = validate_for_push(out)
    assert any("model card's YAML front matter is invalid" in p and "base_model" in p for p in problems)
    assert fake_hub.count("commit") == 0


def test_network_failure_is_one_clear_line(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = merged(tmp_path, [str(p) for p in models(tmp_path)])
    fake_hub.fail_next("/api/", drop=True, times=50)  # every API call: the connection is cut
    result = runner.invoke(app, ["push", str(out), "alice/net"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "cannot reach the Hub" in result.output or "answered" in result.output
