"""The fake Hub (tests/fake_hub.py) driven by the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    BadRequestError,
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session, hf_raise_for_status

pytest.register_assert_rewrite("fake_hub")  # imported here before `pytest_plugins` loads it as a plugin
from fake_hub import FakeHub, serve_fake_hub  # noqa: E402

pytest_plugins = ["fake_hub"]  # the `fake_hub` fixture
# huggingface_hub's own LFS PUT passes a file object as `data=`, which httpx2 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

BIG = 10 * 1024 * 1024 + 4321  # > 10 MiB: LFS whatever the name


def _model_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}\n')
    (root / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- merge\n---\n# merged\n")
    (root / "notes").mkdir(exist_ok=True)
    (root / "notes" / "log.txt").write_text("step 1\nstep 2\n")
    (root / "model.safetensors").write_bytes(os.urandom(BIG))
    return root


def _sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_whoami_and_tokens(fake_hub: FakeHub) -> None:
    me = fake_hub.api("hf_writer").whoami()
    assert me["name"] == "alice"
    assert [org["name"] for org in me["orgs"]] == ["alice-org"]
    assert fake_hub.api("hf_reader").whoami()["name"] == "bob"
    # the module-level function (a bound method of an HfApi built at import) goes to the fake Hub too
    assert huggingface_hub.whoami(token="hf_writer")["name"] == "alice"
    with pytest.raises(HfHubHTTPError) as err:
        fake_hub.api("hf_nope").whoami()
    assert err.value.response.status_code == 401
    # no token is picked up from the machine (HF_TOKEN removed, token file under the temporary HF_HOME)
    with pytest.raises(LocalTokenNotFoundError):
        fake_hub.api(None).whoami()
    assert fake_hub.count("whoami") == 4
    fake_hub.fail_next(endpoint="whoami", drop=True)  # connection closed without an answer
    with pytest.raises(httpx2.RemoteProtocolError):
        fake_hub.api("hf_writer").whoami()


def test_create_repo_rules(fake_hub: FakeHub) -> None:
    api = fake_hub.api("hf_writer")
    url = api.create_repo("alice/merged")
    assert url.repo_id == "alice/merged" and url.endpoint == fake_hub.endpoint
    assert api.create_repo("plain").repo_id == "alice/plain"  # namespace defaults to the token's user
    assert api.create_repo("alice-org/shared", repo_type="dataset").repo_type == "dataset"

    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("alice/merged")
    assert err.value.response.status_code == 409
    assert api.create_repo("alice/merged", exist_ok=True).repo_id == "alice/merged"

    with pytest.raises(HFValidationError):  # the client checks names before sending
        api.create_repo("alice/bad..name")
    # ... and the server applies the Hub's rules to what gets through
    for name in ("bad..name", "-dash", "x" * 97, "ends.git"):
        response = get_session().post(
            f"{fake_hub.endpoint}/api/repos/create",
            json={"name": name, "organization": "alice"},
            headers={"authorization": "Bearer hf_writer"},
        )
        with pytest.raises(BadRequestError):
            hf_raise_for_status(response)

    with pytest.raises(HfHubHTTPError) as err:
        fake_hub.api("hf_reader").create_repo("alice/not-yours")
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        fake_hub.api(False).create_repo("alice/anonymous")
    assert err.value.response.status_code == 401
    assert fake_hub.commit_count("alice/merged") == 1  # the Hub's "initial commit" with .gitattributes


def test_upload_folder_lfs_then_download(fake_hub: FakeHub, tmp_path: Path) -> None:
    src = _model_dir(tmp_path / "src")
    api = fake_hub.api("hf_writer")
    api.create_repo("alice/merged")
    info = huggingface_hub.upload_folder(
        repo_id="alice/merged", folder_path=src, commit_message="Add merged model", token="hf_writer"
    )
    assert info.oid == fake_hub.head("alice/merged")
    assert fake_hub.count("preupload") == 1 and fake_hub.count("lfs_batch") == 1 and fake_hub.count("lfs_upload") == 1
    assert fake_hub.count("validate_yaml") == 2  # README.md metadata, checked by upload_folder and create_commit

    stored = fake_hub.list_files("alice/merged")
    assert stored["model.safetensors"]["lfs"]["sha256"] == _sha(src / "model.safetensors")
    assert stored["config.json"]["lfs"] is None and stored["notes/log.txt"]["lfs"] is None
    assert (fake_hub.repo_path("alice/merged") / "lfs" / _sha(src / "model.safetensors")).is_file()

    expected = {".gitattributes", "README.md", "config.json", "model.safetensors", "notes/log.txt"}
    assert set(api.list_repo_files("alice/merged")) == expected
    repo = api.repo_info("alice/merged", files_metadata=True)
    assert repo.sha == info.oid
    siblings = {s.rfilename: s for s in repo.siblings}
    assert set(siblings) == expected
    assert siblings["model.safetensors"].size == BIG and siblings["model.safetensors"].lfs.size == BIG
    assert [c.title for c in api.list_repo_commits("alice/merged")] == ["Add merged model", "initial commit"]

    for name in ("config.json", "model.safetensors", "notes/log.txt"):
        local = hf_hub_download("alice/merged", name, token="hf_writer")
        assert Path(local).read_bytes() == (src / name).read_bytes()
        assert Path(local).is_relative_to(constants.HF_HUB_CACHE)  # the fixture's temporary cache

    snap = Path(
        snapshot_download(
            "alice/merged", allow_patterns=["*.json", "*.safetensors"], token=False, cache_dir=tmp_path / "cache"
        )
    )
    files = sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())
    assert files == ["config.json", "model.safetensors"]
    for name in files:
        assert _sha(snap / name) == _sha(src / name)

    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/merged", "missing.bin", token=False)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("alice/merged", "config.json", revision="nope", token=False)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/absent", "config.json", token=False)
    assert fake_hub.server_errors == []


def test_private_repo_is_hidden(fake_hub: FakeHub) -> None:
    fake_hub.api("hf_writer").create_repo("alice/secret", private=True)
    fake_hub.commit_files("alice/secret", {"config.json": "{}"})
    assert fake_hub.api("hf_writer").repo_info("alice/secret").private is True
    for token in (False, "hf_reader"):
        with pytest.raises(RepositoryNotFoundError):
            fake_hub.api(token).repo_info("alice/secret")
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("alice/secret", "config.json", token=token)
    assert Path(hf_hub_download("alice/secret", "config.json", token="hf_writer")).read_text() == "{}"


def test_push_needs_write_permission(fake_hub: FakeHub) -> None:
    fake_hub.api("hf_writer").create_repo("alice/public")
    with pytest.raises(HfHubHTTPError) as err:
        fake_hub.api("hf_reader").upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/public")
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        fake_hub.api(False).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/public")
    assert err.value.response.status_code == 401
    assert fake_hub.commit_count("alice/public") == 1


def test_interrupted_push_reruns_without_duplicates(fake_hub: FakeHub, tmp_path: Path) -> None:
    src = _model_dir(tmp_path / "src")
    api = fake_hub.api("hf_writer")
    api.create_repo("alice/resume")
    before = fake_hub.commit_count("alice/resume")
    rule = fake_hub.fail_next("/commit/main", status=500)
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_folder(repo_id="alice/resume", folder_path=src, commit_message="push")
    assert err.value.response.status_code == 500 and rule.hits == 1
    assert fake_hub.commit_count("alice/resume") == before
    assert fake_hub.count("lfs_upload") == 1  # the LFS object did reach storage

    api.upload_folder(repo_id="alice/resume", folder_path=src, commit_message="push")
    assert fake_hub.commit_count("alice/resume") == before + 1
    assert fake_hub.count("lfs_upload") == 1  # already uploaded: the LFS batch answer has no upload action
    assert fake_hub.count("commit") == 2
    # once more: nothing changed, so the client makes no commit at all
    api.upload_folder(repo_id="alice/resume", folder_path=src, commit_message="push")
    assert fake_hub.commit_count("alice/resume") == before + 1


def test_lost_commit_response(fake_hub: FakeHub) -> None:
    api = fake_hub.api("hf_writer")
    api.create_repo("alice/lost")
    fake_hub.fail_next("/commit/", status=502, after=True)  # the commit is made, its answer is lost
    with pytest.raises(HfHubHTTPError):
        api.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id="alice/lost")
    assert fake_hub.commit_count("alice/lost") == 2
    api.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id="alice/lost")  # no-op: same content
    assert fake_hub.commit_count("alice/lost") == 2


def test_create_commit_operations(fake_hub: FakeHub) -> None:
    api = fake_hub.api("hf_writer")
    weights = os.urandom(4096)
    fake_hub.commit_files("alice/ops", {"w.safetensors": weights, "a/x.txt": "x", "a/y.txt": "y", "keep.txt": "k"})
    assert fake_hub.list_files("alice/ops")["w.safetensors"]["lfs"] is not None
    api.create_commit(
        "alice/ops",
        operations=[
            CommitOperationCopy("w.safetensors", "copy/w.safetensors"),
            CommitOperationCopy("keep.txt", "copy/keep.txt"),
            CommitOperationDelete("a/"),
            CommitOperationDelete("keep.txt"),
            CommitOperationAdd("new.txt", b"new"),
        ],
        commit_message="shuffle",
    )
    files = fake_hub.list_files("alice/ops")
    assert sorted(files) == [".gitattributes", "copy/keep.txt", "copy/w.safetensors", "new.txt", "w.safetensors"]
    assert fake_hub.read_file("alice/ops", "copy/w.safetensors") == weights
    assert fake_hub.read_file("alice/ops", "copy/keep.txt") == b"k"
    with pytest.raises(EntryNotFoundError):
        api.delete_file("absent.txt", repo_id="alice/ops")


def test_transient_errors_are_retried(fake_hub: FakeHub) -> None:
    api = fake_hub.api("hf_writer")
    api.create_repo("alice/retry")
    payload = os.urandom(2048)  # *.safetensors: LFS by the Hub's default .gitattributes
    fake_hub.fail_next(endpoint="lfs_upload", status=503)
    api.upload_file(path_or_fileobj=payload, path_in_repo="w.safetensors", repo_id="alice/retry")
    assert fake_hub.count("lfs_upload") == 2
    assert fake_hub.read_file("alice/retry", "w.safetensors") == payload

    fake_hub.fail_next("/resolve/", method="GET", truncate=100)  # connection cut mid-body: resumed with Range
    local = hf_hub_download("alice/retry", "w.safetensors", token=False)
    assert Path(local).read_bytes() == payload


def test_branches_and_pull_requests(fake_hub: FakeHub) -> None:
    api = fake_hub.api("hf_writer")
    api.create_repo("alice/refs")
    with pytest.raises(RevisionNotFoundError):  # as on the Hub: create the branch first
        api.upload_file(path_or_fileobj=b"a", path_in_repo="a.txt", repo_id="alice/refs", revision="dev")
    api.create_branch("alice/refs", branch="dev")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch("alice/refs", branch="dev")
    assert err.value.response.status_code == 409
    api.create_branch("alice/refs", branch="dev", exist_ok=True)

    api.upload_file(path_or_fileobj=b"dev!", path_in_repo="dev.txt", repo_id="alice/refs", revision="dev")
    assert "dev.txt" in api.list_repo_files("alice/refs", revision="dev")
    assert "dev.txt" not in api.list_repo_files("alice/refs")
    assert Path(hf_hub_download("alice/refs", "dev.txt", revision="dev", token=False)).read_bytes() == b"dev!"
    assert {b.name for b in api.list_repo_refs("alice/refs").branches} == {"main", "dev"}

    pr = api.upload_file(path_or_fileobj=b"pr!", path_in_repo="pr.txt", repo_id="alice/refs", create_pr=True)
    assert pr.pr_num == 1 and pr.pr_revision == "refs/pr/1"
    assert "pr.txt" not in api.list_repo_files("alice/refs")
    assert Path(hf_hub_download("alice/refs", "pr.txt", revision="refs/pr/1", token=False)).read_bytes() == b"pr!"
    refs = api.list_repo_refs("alice/refs", include_pull_requests=True)
    assert [(r.ref, r.target_commit) for r in refs.pull_requests] == [("refs/pr/1", pr.oid)]
    # as on the Hub, a read-only token may open a pull request
    assert (
        fake_hub.api("hf_reader")
        .upload_file(path_or_fileobj=b"r", path_in_repo="r.txt", repo_id="alice/refs", create_pr=True)
        .pr_num
        == 2
    )

    head = fake_hub.head("alice/refs")
    api.upload_file(path_or_fileobj=b"1", path_in_repo="1.txt", repo_id="alice/refs", parent_commit=head)
    with pytest.raises(HfHubHTTPError) as err:  # main moved since `head`
        api.upload_file(path_or_fileobj=b"2", path_in_repo="2.txt", repo_id="alice/refs", parent_commit=head)
    assert err.value.response.status_code == 412


def test_tree_pagination(fake_hub: FakeHub) -> None:
    fake_hub.commit_files("alice/many", {f"d/f{i}.txt": str(i) for i in range(5)})
    fake_hub.page_size = 2
    assert len(fake_hub.api(False).list_repo_files("alice/many")) == 6
    assert fake_hub.count("tree") == 4  # 7 entries (6 files and the directory "d"), 2 a page


def test_client_patching_is_restored(tmp_path: Path) -> None:
    endpoint, cache = constants.ENDPOINT, constants.HF_HUB_CACHE
    env = os.environ.get("HF_ENDPOINT")
    with serve_fake_hub(tmp_path / "storage", tmp_path / "home") as hub:
        assert constants.ENDPOINT == hub.endpoint == os.environ["HF_ENDPOINT"]
        assert huggingface_hub.hf_api.api.endpoint == hub.endpoint
        assert constants.HF_HUB_DISABLE_XET and os.environ["HF_HUB_DISABLE_XET"] == "1"
        assert constants.HF_HUB_CACHE == str(tmp_path / "home" / "hub")
    assert (constants.ENDPOINT, constants.HF_HUB_CACHE, os.environ.get("HF_ENDPOINT")) == (endpoint, cache, env)
    assert huggingface_hub.hf_api.api.endpoint == endpoint


def test_requests_record_the_user_agent(fake_hub: FakeHub) -> None:
    fake_hub.api("hf_writer", library_name="probe-tool", library_version="9.9").whoami()
    get_session().get(f"{fake_hub.endpoint}/api/whoami-v2", headers={"User-Agent": "plain/1"})
    agents = fake_hub.user_agents("whoami")
    assert len(agents) == 2 and "probe-tool/9.9" in (agents[0] or "") and agents[1] == "plain/1"
    assert fake_hub.user_agents("commit") == []
