"""Pushing to and reading from the Hub, against the local stand-in (tests/fake_hub.py)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import write_checkpoint
from mergekit_like.cli.main import app
from typer.testing import CliRunner

from mergekit_like import hub
from mergekit_like.errors import HubError, HubNotFoundError
from mergekit_like.hub import is_hub_id, push, resolve_input, validate_for_push
from mergekit_like.io import open_checkpoint

pytest.register_assert_rewrite("fake_hub")
from fake_hub import FakeHub  # noqa: E402

pytest_plugins = ["fake_hub"]
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

runner = CliRunner()
TOKEN = "hf_writer"  # may write to alice/*
BIG_ROWS = 2_700  # 2,700 x 1,024 float32 = 11 MB: more than 10 MiB, so the shard goes through LFS


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeps the retry count, shortens the waits between attempts."""
    monkeypatch.setattr(hub, "RETRY_BASE_DELAY_S", 0.01)


def small_output(tmp_path: Path, name: str = "small") -> Path:
    """A finished output, small enough that a push is quick: one shard and a valid model card."""
    tensors = {"w": torch.arange(6.0), "b": torch.ones(2)}
    out = write_checkpoint(tmp_path / name, tensors, config={"model_type": "llama"})
    (out / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- merge\n---\n# small\n")
    return out


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
    written = [p.read_text() for p in (tmp_path / "m").iterdir() if p.suffix != ".safetensors"]
    texts = [result.output, caplog.text, *written]
    assert all(TOKEN not in text for text in texts)
    assert fake_hub.list_files("alice/m")


def test_interrupted_push_then_rerun_gives_a_complete_repo_and_one_commit(fake_hub: FakeHub, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = merged(tmp_path, [str(p) for p in models(tmp_path)])
    fake_hub.fail_next(endpoint="commit", status=500, times=hub.RETRY_ATTEMPTS)  # every retry fails too
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
    with pytest.raises(HubError, match=r"no README\.md"):
        push(plain, "alice/x")


def test_a_card_the_hub_would_refuse_is_not_pushed(fake_hub: FakeHub, tmp_path: Path) -> None:
    out = merged(tmp_path, [str(p) for p in models(tmp_path)])
    (out / "README.md").write_text("---\nbase_model: [not a repo id!]\nbase_model_relation: blend\n---\n# x\n")
    problems = validate_for_push(out)
    assert any("model card's YAML front matter is invalid" in p and "base_model" in p for p in problems)
    assert fake_hub.count("commit") == 0


@pytest.mark.parametrize("fault", [{"drop": True}, {"status": 503}])
def test_network_failure_is_retried_then_one_clear_line(fake_hub: FakeHub, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, fault: dict[str, Any]) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = small_output(tmp_path)
    fake_hub.fail_next(endpoint="create_repo", times=50, **fault)  # the Hub stays unreachable
    result = runner.invoke(app, ["push", str(out), "alice/net"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert fake_hub.count("create_repo") == hub.RETRY_ATTEMPTS > 1
    assert f"after {hub.RETRY_ATTEMPTS} attempts" in result.output
    assert ("cannot reach the Hub" if "drop" in fault else "answered 503") in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1


def test_a_4xx_answer_is_not_retried(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fake_hub.fail_next(endpoint="create_repo", status=400)
    with pytest.raises(HubError, match="answered 400"):
        push(small_output(tmp_path), "alice/bad-request")
    assert fake_hub.count("create_repo") == 1


@pytest.mark.parametrize("endpoint,fault", [
    ("create_repo", {"drop": True}),
    ("create_repo", {"status": 502}),
    ("commit", {"status": 500}),
    ("commit", {"drop": True}),
])
def test_a_transient_failure_is_retried_and_the_push_makes_one_commit(
        fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, endpoint: str, fault: dict[str, Any],
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = small_output(tmp_path)
    rule = fake_hub.fail_next(endpoint=endpoint, **fault)
    result = runner.invoke(app, ["push", str(out), "alice/flaky", "-q"])
    assert result.exit_code == 0, result.output
    assert rule.hits == 1 and fake_hub.count(endpoint) == 2
    assert fake_hub.commit_count("alice/flaky") == 2  # "initial commit" + the push
    assert {p.name for p in out.iterdir()} <= set(fake_hub.list_files("alice/flaky"))


@pytest.mark.parametrize("fault", [{"status": 502}, {"drop": True}])
def test_a_retried_commit_that_had_landed_makes_no_second_commit(
        fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: dict[str, Any]) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = small_output(tmp_path)
    fake_hub.fail_next(endpoint="commit", after=True, **fault)  # the commit is made, its answer is lost
    result = runner.invoke(app, ["push", str(out), "alice/landed", "-q"])
    assert result.exit_code == 0, result.output
    assert fake_hub.commit_count("alice/landed") == 2  # "initial commit" + one push commit
    assert fake_hub.count("commit") == 1  # the retry found every file there and committed nothing


def test_a_pull_request_commit_that_may_have_landed_is_not_retried(
        fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = small_output(tmp_path)
    fake_hub.create_repo("alice/pr")
    fake_hub.fail_next(endpoint="commit", status=502, after=True)
    result = runner.invoke(app, ["push", str(out), "alice/pr", "--create-pr"])
    assert result.exit_code == 2 and "answered 502" in result.output, result.output
    assert fake_hub.count("commit") == 1 and len(fake_hub.refs("alice/pr")["pull_requests"]) == 1


def test_tensors_missing_from_the_index_refuse_the_push(fake_hub: FakeHub, tmp_path: Path) -> None:
    tensors = {f"layer{i}": torch.full((256,), float(i)) for i in range(4)}
    out = write_checkpoint(tmp_path / "sharded", tensors, max_shard_size=2048)
    (out / "README.md").write_text("---\nlicense: apache-2.0\n---\n# x\n")
    assert validate_for_push(out) == []
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    dropped = sorted(index["weight_map"])[-1]
    del index["weight_map"][dropped]
    index_path.write_text(json.dumps(index))
    with open_checkpoint(out) as checkpoint:  # the reader only warns
        assert dropped not in checkpoint
    problems = validate_for_push(out)
    assert len(problems) == 1 and "not in the index" in problems[0] and f"'{dropped}'" in problems[0], problems
    with pytest.raises(HubError, match="not in the index"):
        push(out, "alice/unindexed", token=TOKEN)
    assert fake_hub.count("create_repo") == 0


def test_a_stray_shard_the_index_never_names_refuses_the_push(fake_hub: FakeHub, tmp_path: Path) -> None:
    out = small_output(tmp_path)
    (out / "model.safetensors").rename(out / "model-00001-of-00001.safetensors")
    names = ["w", "b"]
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
    assert validate_for_push(out) == []
    write_checkpoint(tmp_path / "other", {"extra": torch.ones(3)})
    (tmp_path / "other" / "model.safetensors").rename(out / "model-00002-of-00002.safetensors")
    problems = validate_for_push(out)
    assert any("model-00002-of-00002.safetensors" in p and "'extra'" in p for p in problems), problems


def test_local_paths_win_over_repo_ids(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_checkpoint(tmp_path / "alice" / "a", {"w": torch.ones(4)})
    write_checkpoint(tmp_path / "alice" / "b@main", {"w": torch.zeros(4)})  # a directory literally named so
    assert not is_hub_id("alice/a") and not is_hub_id("alice/a@main") and not is_hub_id("alice/b@main")
    assert is_hub_id("alice/c@main")  # nothing local: a repo id
    assert resolve_input("alice/a@main").path == Path("alice/a")
    assert resolve_input("alice/b@main").path == Path("alice/b@main")
    result = runner.invoke(app, ["merge", "--method", "linear", "alice/a@main", "alice/b@main", "-p", "weight=1,1",
                                 "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert fake_hub.count() == 0  # nothing was asked of the Hub


def test_quiet_resolution_hides_the_download_progress_bars(fake_hub: FakeHub, tmp_path: Path,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    from huggingface_hub.utils import are_progress_bars_disabled

    fake_hub.commit_files("alice/q", {"model.safetensors": (small_output(tmp_path) / "model.safetensors")})
    resolve_input("alice/q", quiet=True)
    assert "Fetching" not in capfd.readouterr().err
    assert not are_progress_bars_disabled()  # restored afterwards
    hub.model_resolver(quiet=False)("alice/q@main")
    assert "Fetching" in capfd.readouterr().err  # the check above can fail: bars do show otherwise


def test_push_to_a_branch_creates_it(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = small_output(tmp_path)
    result = runner.invoke(app, ["push", str(out), "alice/branchy", "--revision", "dev", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["revision"] == "dev"
    assert "dev" in fake_hub.refs("alice/branchy")["branches"]
    assert "model.safetensors" in fake_hub.list_files("alice/branchy", revision="dev")
    assert set(fake_hub.list_files("alice/branchy")) == {".gitattributes"}  # main untouched


def test_push_with_create_pr_opens_a_pull_request(fake_hub: FakeHub, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = small_output(tmp_path)
    result = runner.invoke(app, ["push", str(out), "alice/pr-target", "--create-pr", "--json"])
    assert result.exit_code == 0, result.output
    assert "/discussions/1" in json.loads(result.stdout)["pr_url"]
    assert list(fake_hub.refs("alice/pr-target")["pull_requests"]) == [1]
    assert "model.safetensors" in fake_hub.list_files("alice/pr-target", revision="refs/pr/1")
    assert set(fake_hub.list_files("alice/pr-target")) == {".gitattributes"}  # main untouched


@pytest.mark.parametrize("private", [True, False])
def test_push_private_creates_a_private_repo(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             private: bool) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = small_output(tmp_path)
    result = runner.invoke(app, ["push", str(out), "alice/secret", "-q", *(["--private"] if private else [])])
    assert result.exit_code == 0, result.output
    assert json.loads((fake_hub.repo_path("alice/secret") / "meta.json").read_text())["private"] is private


def test_every_request_names_the_tool_in_its_user_agent(fake_hub: FakeHub, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = runner.invoke(app, ["push", str(small_output(tmp_path)), "alice/ua", "-q"])
    assert result.exit_code == 0, result.output
    resolve_input("alice/ua", quiet=True)
    assert {"create_repo", "preupload", "commit", "resolve"} <= {r.endpoint for r in fake_hub.requests}
    agents = [r.user_agent or "" for r in fake_hub.requests if r.endpoint != "lfs_upload"]
    assert agents and all(f"mergekit-like/{hub.__version__}" in agent for agent in agents), agents


def test_push_create_pr_against_a_branch_that_does_not_exist_is_one_line(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = small_output(tmp_path)
    result = runner.invoke(app, ["push", str(out), "alice/pr-x", "--create-pr", "--revision", "x"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "ValueError" not in result.output
    assert "--create-pr" in result.output and "'x'" in result.output


def test_a_credential_in_the_endpoint_is_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://user:hf_secret@127.0.0.1:9")
    error = hub._hub_error("alice/x", ConnectionError("refused by http://user:hf_secret@127.0.0.1:9/api"), None, 3)
    assert "hf_secret" not in str(error) and "http://127.0.0.1:9" in str(error)
    assert hub.without_credentials("see https://a:b@h.io/x and ftp://c@d") == "see https://h.io/x and ftp://d"


def test_a_download_failure_speaks_of_downloading_and_of_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants, errors

    refused = hub._hub_error("alice/x", ConnectionError("refused"), None, 3, download=True)
    assert "re-run downloads only what is missing" in str(refused) and "uploads" not in str(refused)
    monkeypatch.setattr(constants, "is_offline_mode", lambda: True)
    offline = hub._hub_error("alice/x", errors.LocalEntryNotFoundError("no snapshot"), None, 1, download=True)
    assert isinstance(offline, HubNotFoundError)
    assert "not in the local cache, and HF_HUB_OFFLINE is set" in str(offline) and "cannot reach" not in str(offline)
