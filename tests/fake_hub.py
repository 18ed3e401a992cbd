"""A local stand-in for the Hugging Face Hub HTTP API, so that push/download code runs without internet.

The REAL ``huggingface_hub`` client (checked against 2.4.0) talks to it over HTTP on 127.0.0.1. Standard library
only (``http.server``); repos live in a temporary directory, git-like: every commit is a full snapshot of the
files (path -> blob) with a sha1 commit id, branches / tags / PR refs (``refs/pr/N``) map to commits.

Use it from a test module::

    pytest_plugins = ["fake_hub"]          # registers the `fake_hub` fixture (tests/ is on sys.path)

    def test_push(fake_hub, tmp_path):
        api = fake_hub.api("hf_writer")    # HfApi(endpoint=fake_hub.endpoint, token="hf_writer")
        api.create_repo("alice/merged")
        api.upload_folder(repo_id="alice/merged", folder_path=tmp_path)
        assert len(fake_hub.commits("alice/merged")) == 2   # "initial commit" + the upload

(``from fake_hub import fake_hub`` works too, but linters flag the re-definition by the test's argument.)

While the fixture is active, module-level functions (``hf_hub_download``, ``snapshot_download``,
``huggingface_hub.upload_folder``...) and ``HfApi()`` without ``endpoint=`` go to the fake Hub as well: the fixture
sets HF_ENDPOINT / HF_HUB_DISABLE_XET / HF_HUB_DISABLE_TELEMETRY / HF_HOME / HF_HUB_CACHE in the environment (for
subprocesses) and patches the values that the already-imported client read at import time
(``huggingface_hub.constants.ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``, cache paths, ``HF_HUB_DISABLE_XET``...,
the endpoint of the module-level ``huggingface_hub.hf_api.api``). Everything is restored afterwards. HF_HUB_OFFLINE
is removed, never set (it blocks loopback requests too). No token is picked up from the machine: pass one.

Tokens (``fake_hub.tokens``, extend with ``add_token``): ``hf_writer`` is user ``alice`` with write access to the
namespaces ``alice`` and ``alice-org``; ``hf_reader`` is user ``bob`` without write access. Missing token on a write
-> 401, unknown token anywhere -> 401, valid token without permission -> 403, private repo without access -> 404
(``RepositoryNotFoundError``). Errors carry ``{"error": ...}`` bodies and ``X-Error-Code`` / ``X-Error-Message``
headers as the Hub does (RepoNotFound, RevisionNotFound, EntryNotFound).

Fault injection: ``fake_hub.fail_next("/commit/", status=500, times=1)`` makes the next matching request fail
(``after=True``: process it, then answer the error, i.e. a lost response; ``drop=True``: close the connection
without answering; ``truncate=N``: send only N bytes of the body). ``count(endpoint)`` counts requests per endpoint
name (see ``ENDPOINTS``), ``user_agents(endpoint)`` lists the User-Agent header of each request, ``commits(repo_id)``
lists a repo's commits in creation order.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import fnmatch
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import traceback
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import pytest

# Endpoint names used by `count()`, `fail_next(endpoint=...)` and the request log.
ENDPOINTS = (
    "whoami",
    "create_repo",
    "delete_repo",
    "validate_yaml",
    "repo_info",
    "repo_settings",
    "tree",
    "paths_info",
    "refs",
    "list_commits",
    "create_branch",
    "delete_branch",
    "create_tag",
    "delete_tag",
    "preupload",
    "commit",
    "lfs_batch",
    "lfs_verify",
    "lfs_upload",
    "resolve",
    "unknown",
)

REPO_TYPES = ("model", "dataset", "space")
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_PREFIX_TO_TYPE = {"datasets": "dataset", "spaces": "space"}

# What the Hub writes in the initial commit of a new repo.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)  # fmt: skip

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,96}")
_SHA_RE = re.compile(r"[0-9a-f]{7,40}")
_OID256_RE = re.compile(r"[0-9a-f]{64}")
_PR_RE = re.compile(r"refs/pr/(\d+)")
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TokenInfo:
    """A valid access token: `user` owns it; it may write to `write` namespaces, read private repos of `read` ones."""

    user: str
    write: frozenset[str] = frozenset()
    read: frozenset[str] = frozenset()

    def can_read(self, namespace: str) -> bool:
        return namespace in self.write or namespace in self.read or namespace == self.user

    def can_write(self, namespace: str) -> bool:
        return namespace in self.write


def default_tokens() -> dict[str, TokenInfo]:
    return {
        "hf_writer": TokenInfo(user="alice", write=frozenset({"alice", "alice-org"})),
        "hf_reader": TokenInfo(user="bob"),
    }


@dataclass
class FaultRule:
    """One `fail_next` rule; `remaining` counts down as matching requests hit it."""

    match: str | None
    endpoint: str | None
    method: str | None
    status: int
    remaining: int
    after: bool
    drop: bool
    truncate: int | None
    message: str
    headers: dict[str, str]
    hits: int = 0

    def matches(self, method: str, endpoint: str, target: str, raw_target: str) -> bool:
        if self.remaining <= 0:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        if self.endpoint is not None and self.endpoint != endpoint:
            return False
        return self.match is None or self.match in target or self.match in raw_target


@dataclass
class RequestRecord:
    method: str
    path: str  # unquoted path + query
    endpoint: str
    status: int | None = None  # None: connection dropped
    user: str | None = None
    injected: bool = False
    user_agent: str | None = None  # so tests can check what the client says it is


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    path: Path
    created_at: str
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    prs: dict[int, str] = field(default_factory=dict)
    commits: dict[str, dict[str, Any]] = field(default_factory=dict)
    commit_order: list[str] = field(default_factory=list)
    next_discussion: int = 1

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


class HubError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})  # more fields of the JSON error body


@dataclass
class _Resp:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    file: Path | None = None
    offset: int = 0
    length: int | None = None  # body length (file slice length when `file`)


@dataclass
class _Ctx:
    method: str
    segs: list[str]
    query: dict[str, list[str]]
    raw_path: str
    token: TokenInfo | None
    body: _Body
    headers: Any  # the request's headers (email.message.Message)

    def q(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        return (self.q(name) or "").lower() in ("1", "true", "yes", "on")

    def json(self) -> Any:
        data = self.body.read_all()
        if not data:
            return {}
        try:
            return json.loads(data)
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err


class _Body:
    """Request body, read lazily (chunked or Content-Length); always drained before answering."""

    def __init__(self, handler: BaseHTTPRequestHandler):
        self._rfile = handler.rfile
        self._chunked = "chunked" in (handler.headers.get("Transfer-Encoding") or "").lower()
        self._left = int(handler.headers.get("Content-Length") or 0)
        self._done = not self._chunked and self._left == 0

    def iter(self) -> Iterator[bytes]:
        if self._done:
            return
        if self._chunked:
            while True:
                line = self._rfile.readline()
                if not line:
                    raise ConnectionError("client went away")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self._rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                while size:
                    data = self._rfile.read(min(size, _CHUNK))
                    if not data:
                        raise ConnectionError("client went away")
                    size -= len(data)
                    yield data
                self._rfile.readline()
        else:
            while self._left > 0:
                data = self._rfile.read(min(self._left, _CHUNK))
                if not data:
                    raise ConnectionError("client went away")
                self._left -= len(data)
                yield data
        self._done = True

    def read_all(self) -> bytes:
        return b"".join(self.iter())

    def drain(self) -> None:
        for _ in self.iter():
            pass


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


# The subset of the Hub's model-card metadata rules that the tool's cards exercise.
_CARD_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _card_metadata_errors(content: str) -> list[str]:
    """What the Hub's validate-yaml refuses: front matter that is not a mapping, or bad fields."""
    import yaml

    match = re.match(r"^---\n(.*?)\n---", content, re.S)
    if not match:
        return []
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        return [f"invalid YAML: {exc}"]
    if meta is None:
        return []
    if not isinstance(meta, dict):
        return ["metadata must be a mapping"]
    errors = []
    base = meta.get("base_model")
    bases = base if isinstance(base, list) else [base] if base is not None else []
    if any(not isinstance(b, str) or not _REPO_ID.match(b) for b in bases):
        errors.append(f'"base_model" must be Hub repo ids, got {base!r}')
    relation = meta.get("base_model_relation")
    if relation is not None and relation not in _CARD_RELATIONS:
        errors.append(f'"base_model_relation" must be one of {sorted(_CARD_RELATIONS)}')
    if relation is not None and not bases:
        errors.append('"base_model_relation" needs "base_model"')
    tags = meta.get("tags")
    if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
        errors.append('"tags" must be a list of strings')
    for key in ("license", "library_name", "pipeline_tag"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    return errors


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _valid_name(name: str) -> bool:
    """The Hub's rules for a namespace or repo name."""
    return bool(
        _NAME_RE.fullmatch(name)
        and name[0] not in "-."
        and name[-1] not in "-."
        and "--" not in name
        and ".." not in name
        and not name.endswith(".git")
    )


def _valid_path(path: str) -> bool:
    parts = path.split("/")
    return (
        bool(path) and not path.startswith("/") and all(p not in ("", ".", "..") for p in parts) and parts[0] != ".git"
    )


def _pattern_lines(content: str) -> list[str]:
    return [line.strip() for line in content.splitlines() if line.strip() and not line.strip().startswith("#")]


def _path_matches(pattern: str, path: str) -> bool:
    pattern = pattern.rstrip("/")
    if "/" not in pattern:
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern) or any(
            fnmatch.fnmatchcase(part, pattern) for part in path.split("/")[:-1]
        )
    return fnmatch.fnmatchcase(path, pattern.lstrip("/")) or path.startswith(pattern.lstrip("/") + "/")


# --------------------------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"
    timeout = 60  # idle keep-alive connections end eventually

    def log_message(self, format: str, *args: Any) -> None:  # silence
        pass

    def _dispatch(self) -> None:
        self.server.hub._handle(self)  # type: ignore[attr-defined]

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch


class FakeHub:
    """The fake Hub: state, HTTP server, test helpers. Start with `start()` or use as a context manager."""

    def __init__(
        self,
        root: str | Path | None = None,
        tokens: Mapping[str, TokenInfo] | None = None,
        *,
        lfs_threshold: int = 10 * 1024 * 1024,
        page_size: int = 1000,
        allow_pr_from_readers: bool = True,
        auto_create_branches: bool = False,
        anonymous_not_found_status: int = 404,
    ):
        self._tmp: str | None = None
        if root is None:
            self._tmp = tempfile.mkdtemp(prefix="fake_hub_")
            root = self._tmp
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tokens: dict[str, TokenInfo] = dict(default_tokens() if tokens is None else tokens)
        self.lfs_threshold = lfs_threshold  # files larger than this (or binary, or .gitattributes lfs) go to LFS
        self.page_size = page_size  # tree / commit listing page size (Link: rel="next" pagination)
        self.allow_pr_from_readers = allow_pr_from_readers  # as on the Hub: any valid token may open a PR
        self.auto_create_branches = auto_create_branches  # the Hub answers RevisionNotFound instead
        # Status of "repo not found / private" without a token: the real Hub answers 401 (still X-Error-Code
        # RepoNotFound, so still RepositoryNotFoundError client-side); 404 by default here.
        self.anonymous_not_found_status = anonymous_not_found_status
        self.requests: list[RequestRecord] = []
        self.server_errors: list[str] = []  # tracebacks of unexpected exceptions in handlers
        self._faults: list[FaultRule] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._uploads: dict[str, tuple[tuple[str, str], str, int]] = {}
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> FakeHub:
        if self._httpd is None:
            httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            httpd.daemon_threads = True
            httpd.hub = self  # type: ignore[attr-defined]
            self._httpd = httpd
            self._thread = threading.Thread(
                target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._httpd is None:
            raise RuntimeError("FakeHub is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host if isinstance(host, str) else host.decode()}:{port}"

    # ---------------------------------------------------------------- test helpers

    def api(self, token: str | bool | None = "hf_writer", **kwargs: Any) -> Any:
        """A `HfApi` pointed at this server (token=False: anonymous)."""
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=token, **kwargs)

    def add_token(self, token: str, user: str, write: Iterable[str] = (), read: Iterable[str] = ()) -> None:
        self.tokens[token] = TokenInfo(user=user, write=frozenset(write), read=frozenset(read))

    def fail_next(
        self,
        path_substring: str | None = None,
        status: int = 500,
        times: int = 1,
        *,
        endpoint: str | None = None,
        method: str | None = None,
        after: bool = False,
        drop: bool = False,
        truncate: int | None = None,
        message: str = "Injected failure",
        headers: Mapping[str, str] | None = None,
    ) -> FaultRule:
        """Make the next `times` requests whose (unquoted) path+query contains `path_substring` (and/or whose endpoint
        name is `endpoint`, method is `method`) fail with `status`.

        after=True: the request is processed (e.g. the commit is made) and then the error is answered.
        drop=True: the connection is closed without an answer. truncate=N: the real answer, cut after N body bytes.
        """
        if path_substring is None and endpoint is None:
            raise ValueError("give path_substring and/or endpoint")
        if endpoint is not None and endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {ENDPOINTS}")
        rule = FaultRule(
            match=path_substring,
            endpoint=endpoint,
            method=method,
            status=status,
            remaining=times,
            after=after,
            drop=drop,
            truncate=truncate,
            message=message,
            headers=dict(headers or {}),
        )
        with self._lock:
            self._faults.append(rule)
        return rule

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def count(self, endpoint: str | None = None, *, method: str | None = None, path_contains: str | None = None) -> int:
        """Number of requests received (injected failures included) matching the filters."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (endpoint is None or r.endpoint == endpoint)
                and (method is None or r.method == method.upper())
                and (path_contains is None or path_contains in r.path)
            )

    def user_agents(self, endpoint: str | None = None) -> list[str | None]:
        """The User-Agent header of every request received (matching `endpoint`), in arrival order."""
        with self._lock:
            return [r.user_agent for r in self.requests if endpoint is None or r.endpoint == endpoint]

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()

    def repo_path(self, repo_id: str, repo_type: str = "model") -> Path:
        """Directory holding a repo: meta.json, refs.json, commits/<sha>.json, blobs/<git-oid>, lfs/<sha256>."""
        return self.root / f"{repo_type}s" / repo_id

    def commits(self, repo_id: str, repo_type: str = "model") -> list[dict[str, Any]]:
        """All commits of a repo (every ref), oldest first: id, parents, title, message, author, date, ref, files."""
        with self._lock:
            repo = self._repo_or_raise(repo_type, repo_id)
            return [copy.deepcopy(repo.commits[sha]) for sha in repo.commit_order]

    def commit_count(self, repo_id: str, repo_type: str = "model") -> int:
        return len(self.commits(repo_id, repo_type))

    def refs(self, repo_id: str, repo_type: str = "model") -> dict[str, dict[Any, str]]:
        with self._lock:
            repo = self._repo_or_raise(repo_type, repo_id)
            return {"branches": dict(repo.branches), "tags": dict(repo.tags), "pull_requests": dict(repo.prs)}

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        with self._lock:
            return self._resolve(self._repo_or_raise(repo_type, repo_id), revision)

    def list_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, dict[str, Any]]:
        """path -> {"oid", "size", "lfs": {...} | None} at a revision."""
        with self._lock:
            repo = self._repo_or_raise(repo_type, repo_id)
            return copy.deepcopy(repo.commits[self._resolve(repo, revision)]["files"])

    def read_file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        with self._lock:
            repo = self._repo_or_raise(repo_type, repo_id)
            entry = repo.commits[self._resolve(repo, revision)]["files"].get(path)
            if entry is None:
                raise KeyError(path)
            return self._blob_path(repo, entry).read_bytes()

    def create_repo(
        self, repo_id: str, *, repo_type: str = "model", private: bool = False, author: str | None = None
    ) -> None:
        """Create a repo directly (no HTTP, no auth), with the Hub's initial .gitattributes commit."""
        with self._lock:
            self._create_repo(repo_type, repo_id, private, author or repo_id.split("/")[0])

    def commit_files(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | Path],
        *,
        message: str = "Seed files",
        revision: str = "main",
        repo_type: str = "model",
        delete: Iterable[str] = (),
        create: bool = True,
        private: bool = False,
    ) -> str:
        """Commit files directly (no HTTP, no auth), e.g. to seed an input model; returns the commit sha.
        Values: bytes, a str (text content) or a Path (read from disk). Creates the repo (and branch) if needed."""
        with self._lock:
            key = (repo_type, repo_id.lower())
            if key not in self._repos:
                if not create:
                    raise KeyError(repo_id)
                self._create_repo(repo_type, repo_id, private, repo_id.split("/")[0])
            repo = self._repos[key]
            if revision not in repo.branches and not _PR_RE.fullmatch(revision):
                repo.branches[revision] = repo.branches["main"]
            ref: tuple[str, Any] = ("branch", revision)
            pr = _PR_RE.fullmatch(revision)
            if pr:
                ref = ("pr", int(pr.group(1)))
            parent = repo.prs[ref[1]] if pr else repo.branches[revision]
            tree = dict(repo.commits[parent]["files"])
            for path in delete:
                tree.pop(path, None)
            for path, value in files.items():
                data = (
                    value.read_bytes()
                    if isinstance(value, Path)
                    else value.encode()
                    if isinstance(value, str)
                    else value
                )
                if self._is_lfs(repo, tree, path, len(data), data[:512]):
                    sha256 = hashlib.sha256(data).hexdigest()
                    dest = repo.path / "lfs" / sha256
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(data)
                    tree[path] = self._lfs_entry(sha256, len(data))
                else:
                    tree[path] = self._store_regular(repo, data)
            return self._write_commit(repo, ref, parent, tree, message, "", repo.namespace)

    # ---------------------------------------------------------------- storage

    def _repo_or_raise(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id.lower()))
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r}")
        return repo

    def _create_repo(self, repo_type: str, repo_id: str, private: bool, author: str) -> _Repo:
        path = self.repo_path(repo_id, repo_type)
        path.mkdir(parents=True, exist_ok=True)
        repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private, path=path, created_at=_now())
        self._repos[(repo_type, repo_id.lower())] = repo
        tree = {".gitattributes": self._store_regular(repo, DEFAULT_GITATTRIBUTES.encode())}
        self._write_commit(repo, ("branch", "main"), None, tree, "initial commit", "", author)
        return repo

    def _store_regular(self, repo: _Repo, data: bytes) -> dict[str, Any]:
        oid = _git_oid(data)
        dest = repo.path / "blobs" / oid
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        return {"oid": oid, "size": len(data), "lfs": None}

    @staticmethod
    def _lfs_entry(sha256: str, size: int) -> dict[str, Any]:
        pointer = _lfs_pointer(sha256, size)
        return {
            "oid": _git_oid(pointer),
            "size": size,
            "lfs": {"sha256": sha256, "size": size, "pointerSize": len(pointer)},
        }

    @staticmethod
    def _blob_path(repo: _Repo, entry: Mapping[str, Any]) -> Path:
        if entry["lfs"]:
            return repo.path / "lfs" / entry["lfs"]["sha256"]
        return repo.path / "blobs" / entry["oid"]

    def _write_commit(
        self,
        repo: _Repo,
        ref: tuple[str, Any],
        parent: str | None,
        files: dict[str, dict[str, Any]],
        title: str,
        message: str,
        author: str,
    ) -> str:
        self._counter += 1
        date = _now()
        record: dict[str, Any] = {
            "parents": [parent] if parent else [],
            "title": title,
            "message": message,
            "author": author,
            "date": date,
            "ref": f"refs/heads/{ref[1]}" if ref[0] == "branch" else f"refs/pr/{ref[1]}",
            "files": files,
        }
        sha = hashlib.sha1(
            json.dumps({**record, "n": self._counter, "salt": secrets.token_hex(4)}, sort_keys=True).encode()
        ).hexdigest()
        record = {"id": sha, **record}
        repo.commits[sha] = record
        repo.commit_order.append(sha)
        if ref[0] == "branch":
            repo.branches[ref[1]] = sha
        else:
            repo.prs[ref[1]] = sha
        (repo.path / "commits").mkdir(parents=True, exist_ok=True)
        (repo.path / "commits" / f"{sha}.json").write_text(json.dumps(record, indent=1))
        self._save_meta(repo)
        return sha

    def _save_meta(self, repo: _Repo) -> None:
        meta = {"type": repo.repo_type, "id": repo.repo_id, "private": repo.private, "createdAt": repo.created_at}
        (repo.path / "meta.json").write_text(json.dumps(meta, indent=1))
        refs = {"branches": repo.branches, "tags": repo.tags, "pullRequests": {str(k): v for k, v in repo.prs.items()}}
        (repo.path / "refs.json").write_text(json.dumps(refs, indent=1))

    def _resolve(self, repo: _Repo, rev: str) -> str:
        """Branch, tag, refs/heads|tags/..., refs/pr/N, or a (unique prefix of a) commit sha -> commit sha."""
        if rev.startswith("refs/heads/") and rev[len("refs/heads/") :] in repo.branches:
            return repo.branches[rev[len("refs/heads/") :]]
        if rev.startswith("refs/tags/") and rev[len("refs/tags/") :] in repo.tags:
            return repo.tags[rev[len("refs/tags/") :]]
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.tags:
            return repo.tags[rev]
        pr = _PR_RE.fullmatch(rev)
        if pr and int(pr.group(1)) in repo.prs:
            return repo.prs[int(pr.group(1))]
        if _SHA_RE.fullmatch(rev):
            found = [sha for sha in repo.commits if sha.startswith(rev)]
            if len(found) == 1:
                return found[0]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _is_lfs(self, repo: _Repo, tree: Mapping[str, Any], path: str, size: int, sample: bytes) -> bool:
        if size == 0:
            return False
        if size > self.lfs_threshold or b"\x00" in sample:
            return True
        attributes = tree.get(".gitattributes")
        if attributes is None:
            return False
        text = self._blob_path(repo, attributes).read_text(errors="replace")
        for line in _pattern_lines(text):
            pattern, *attrs = line.split()
            if "filter=lfs" in attrs and _path_matches(pattern, path):
                return True
        return False

    # ---------------------------------------------------------------- HTTP plumbing

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        method = h.command.upper()
        split = urlsplit(h.path)
        raw_segs = split.path.split("/")[1:]
        segs = [unquote(s) for s in raw_segs]
        target = unquote(split.path) + ("?" + unquote(split.query) if split.query else "")
        body = _Body(h)
        auth = h.headers.get("Authorization") or ""
        token_str = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        token = self.tokens.get(token_str) if token_str else None
        handler, endpoint = self._route(method, segs)
        record = RequestRecord(
            method=method, path=target, endpoint=endpoint, user=token.user if token else None,
            user_agent=h.headers.get("User-Agent"),
        )
        with self._lock:
            self.requests.append(record)
            rule = next((r for r in self._faults if r.matches(method, endpoint, target, h.path)), None)
            if rule is not None:
                rule.remaining -= 1
                rule.hits += 1
        ctx = _Ctx(method, segs, parse_qs(split.query, keep_blank_values=True), split.path, token, body, h.headers)

        resp: _Resp | None
        if rule is not None and not rule.after and rule.truncate is None:
            resp = None
        else:
            try:
                if token_str and token is None and endpoint != "lfs_upload":
                    raise HubError(401, "Invalid credentials in Authorization header")
                resp = handler(ctx)
            except HubError as err:
                resp = self._error(err)
            except (ConnectionError, TimeoutError):
                h.close_connection = True
                return
            except Exception:
                self.server_errors.append(traceback.format_exc())
                resp = self._error(
                    HubError(500, "Internal Error - We're working hard to fix this as soon as possible!")
                )
        try:
            body.drain()
        except (ConnectionError, TimeoutError, ValueError):
            h.close_connection = True
            return
        if rule is not None:
            record.injected = True
            if rule.drop:
                h.close_connection = True
                return
            if rule.truncate is None or resp is None:
                resp = self._error(HubError(rule.status, rule.message, headers=rule.headers))
        assert resp is not None
        record.status = resp.status
        try:
            self._send(h, resp, method, truncate=rule.truncate if rule is not None else None)
        except (ConnectionError, TimeoutError):
            h.close_connection = True

    def _send(self, h: BaseHTTPRequestHandler, resp: _Resp, method: str, truncate: int | None = None) -> None:
        length = resp.length if resp.length is not None else len(resp.body)
        h.send_response(resp.status)
        for key, value in resp.headers:
            h.send_header(key, value)
        h.send_header("Content-Length", str(length))
        if truncate is not None:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        if method == "HEAD":
            h.wfile.flush()
            return
        limit = length if truncate is None else min(truncate, length)
        if resp.file is not None:
            with open(resp.file, "rb") as f:
                f.seek(resp.offset)
                while limit > 0:
                    data = f.read(min(_CHUNK, limit))
                    if not data:
                        break
                    h.wfile.write(data)
                    limit -= len(data)
        else:
            h.wfile.write(resp.body[:limit])
        h.wfile.flush()

    @staticmethod
    def _json(
        obj: Any, status: int = 200, headers: Iterable[tuple[str, str]] = (), content_type: str = "application/json"
    ) -> _Resp:
        return _Resp(status, [("Content-Type", content_type), *headers], json.dumps(obj).encode())

    def _error(self, err: HubError) -> _Resp:
        headers = [("X-Error-Message", err.message.encode("ascii", "replace").decode().replace("\n", " "))]
        if err.code:
            headers.append(("X-Error-Code", err.code))
        headers.extend(err.headers.items())
        return self._json({"error": err.message, **err.extra}, err.status, headers)

    def _route(self, method: str, segs: list[str]) -> tuple[Any, str]:
        n = len(segs)
        if n >= 2 and segs[0] == "api":
            if segs[1] == "whoami-v2" and n == 2 and method == "GET":
                return self._h_whoami, "whoami"
            if segs[1:] == ["repos", "create"] and method == "POST":
                return self._h_create_repo, "create_repo"
            if segs[1:] == ["repos", "delete"] and method == "DELETE":
                return self._h_delete_repo, "delete_repo"
            if segs[1:] == ["validate-yaml"] and method == "POST":
                return self._h_validate_yaml, "validate_yaml"
            if segs[1] in ("models", "datasets", "spaces") and n >= 4:
                op = segs[4] if n > 4 else None
                table: dict[tuple[str | None, str], tuple[Any, str]] = {
                    (None, "GET"): (self._h_repo_info, "repo_info"),
                    ("revision", "GET"): (self._h_repo_info, "repo_info"),
                    ("settings", "PUT"): (self._h_settings, "repo_settings"),
                    ("tree", "GET"): (self._h_tree, "tree"),
                    ("paths-info", "POST"): (self._h_paths_info, "paths_info"),
                    ("refs", "GET"): (self._h_refs, "refs"),
                    ("commits", "GET"): (self._h_list_commits, "list_commits"),
                    ("branch", "POST"): (self._h_create_branch, "create_branch"),
                    ("branch", "DELETE"): (self._h_delete_branch, "delete_branch"),
                    ("tag", "POST"): (self._h_create_tag, "create_tag"),
                    ("tag", "DELETE"): (self._h_delete_tag, "delete_tag"),
                    ("preupload", "POST"): (self._h_preupload, "preupload"),
                    ("commit", "POST"): (self._h_commit, "commit"),
                }
                if (op, method) in table:
                    return table[(op, method)]
            return self._h_not_found, "unknown"
        if n == 2 and segs[0] == "__fake_s3" and method == "PUT":
            return self._h_lfs_upload, "lfs_upload"
        rest = segs[1:] if segs and segs[0] in _PREFIX_TO_TYPE else segs
        if len(rest) == 6 and rest[1].endswith(".git") and rest[2:5] == ["info", "lfs", "objects"] and method == "POST":
            if rest[5] == "batch":
                return self._h_lfs_batch, "lfs_batch"
            if rest[5] == "verify":
                return self._h_lfs_verify, "lfs_verify"
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            return self._h_resolve, "resolve"
        return self._h_not_found, "unknown"

    # ---------------------------------------------------------------- auth / lookup helpers

    @staticmethod
    def _require_token(ctx: _Ctx) -> TokenInfo:
        if ctx.token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return ctx.token

    def _api_repo(self, ctx: _Ctx) -> tuple[str, str]:
        return _PREFIX_TO_TYPE.get(ctx.segs[1], "model"), f"{ctx.segs[2]}/{ctx.segs[3]}"

    def _get_repo(self, ctx: _Ctx, repo_type: str, repo_id: str, *, write: bool = False, pr: bool = False) -> _Repo:
        repo = self._repos.get((repo_type, repo_id.lower()))
        if repo is None or (repo.private and not (ctx.token and ctx.token.can_read(repo.namespace))):
            status = 404 if ctx.token is not None else self.anonymous_not_found_status
            raise HubError(status, "Repository not found", "RepoNotFound")
        if write:
            if ctx.token is None:
                raise HubError(401, "You must be authenticated to write to this repository")
            if not ctx.token.can_write(repo.namespace) and not (pr and self.allow_pr_from_readers):
                raise HubError(403, f"You don't have the rights to write to the {repo_type} repository {repo.repo_id}")
        return repo

    @staticmethod
    def _split_rev(parts: list[str]) -> tuple[str, list[str]]:
        """First element(s) of a path as a revision: one (url-encoded) segment, or unencoded refs/xxx/yyy."""
        if not parts:
            return "main", []
        if parts[0] == "refs" and len(parts) >= 3:
            return "/".join(parts[:3]), parts[3:]
        return parts[0], parts[1:]

    def _repo_url(self, repo: _Repo) -> str:
        return f"{self.endpoint}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _file_info(self, repo: _Repo, path: str, entry: Mapping[str, Any], expand: bool, head: str) -> dict[str, Any]:
        info: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        if entry["lfs"]:
            lfs = entry["lfs"]
            info["lfs"] = {"oid": lfs["sha256"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
        if expand:
            last = self._last_commit(repo, head, path)
            info["lastCommit"] = {"id": last["id"], "title": last["title"], "date": last["date"]}
            info["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False}, "pickleImportScan": None}
        return info

    def _last_commit(self, repo: _Repo, head: str, path: str) -> dict[str, Any]:
        prefix = path.rstrip("/") + "/"

        def state(sha: str) -> Any:
            files = repo.commits[sha]["files"]
            return sorted((p, e["oid"]) for p, e in files.items() if p == path or p.startswith(prefix))

        sha = head
        while repo.commits[sha]["parents"]:
            parent = repo.commits[sha]["parents"][0]
            if state(parent) != state(sha):
                break
            sha = parent
        return repo.commits[sha]

    @staticmethod
    def _dirs(files: Iterable[str]) -> set[str]:
        dirs: set[str] = set()
        for path in files:
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        return dirs

    @staticmethod
    def _dir_info(files: Mapping[str, Any], path: str) -> dict[str, Any]:
        prefix = path + "/"
        listing = "".join(f"{p} {e['oid']}\n" for p, e in sorted(files.items()) if p.startswith(prefix))
        return {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": path}

    def _paginate(self, ctx: _Ctx, items: list[Any], page_size: int) -> _Resp:
        try:
            start = int(ctx.q("cursor") or 0)
        except ValueError as err:
            raise HubError(400, "Invalid cursor") from err
        page = items[start : start + page_size]
        headers = []
        if start + page_size < len(items):
            params = [(k, v) for k, values in ctx.query.items() if k != "cursor" for v in values]
            params.append(("cursor", str(start + page_size)))
            headers.append(("Link", f'<{self.endpoint}{ctx.raw_path}?{urlencode(params)}>; rel="next"'))
        return self._json(page, headers=headers)

    # ---------------------------------------------------------------- endpoints: account & repos

    def _h_not_found(self, ctx: _Ctx) -> _Resp:
        raise HubError(404, f"Sorry, we can't find the page you are looking for ({ctx.method} {ctx.raw_path}).")

    def _h_whoami(self, ctx: _Ctx) -> _Resp:
        tok = self._require_token(ctx)
        token_name = next((k for k, v in self.tokens.items() if v is tok), "token")
        orgs = sorted((tok.write | tok.read) - {tok.user})
        return self._json(
            {
                "type": "user",
                "id": hashlib.md5(tok.user.encode()).hexdigest()[:24],
                "name": tok.user,
                "fullname": tok.user.title(),
                "email": f"{tok.user}@example.com",
                "emailVerified": True,
                "isPro": False,
                "canPay": False,
                "avatarUrl": "",
                "orgs": [
                    {"type": "org", "name": org, "fullname": org, "roleInOrg": "write" if org in tok.write else "read"}
                    for org in orgs
                ],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": token_name, "role": "write" if tok.write else "read"},
                },
            }
        )

    def _h_create_repo(self, ctx: _Ctx) -> _Resp:
        tok = self._require_token(ctx)
        payload = ctx.json()
        name = payload.get("name") or ""
        namespace = payload.get("organization") or tok.user
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        for value in (namespace, name):
            if not isinstance(value, str) or not _valid_name(value):
                raise HubError(
                    400,
                    f"Invalid repo name {namespace}/{name}: names may only use letters, digits, '-', '_' and '.', "
                    "cannot start or end with '-' or '.', cannot contain '--' or '..', cannot end with '.git' "
                    "and are at most 96 characters long.",
                )
        if not tok.can_write(namespace):
            raise HubError(403, f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"')
        private = payload.get("visibility") == "private" or payload.get("private") is True
        repo_id = f"{namespace}/{name}"
        with self._lock:
            existing = self._repos.get((repo_type, repo_id.lower()))
            if existing is not None:
                # The client reads "url" from this 409 body when exist_ok=True.
                raise HubError(
                    409,
                    f"You already created this {repo_type} repo",
                    extra={"url": self._repo_url(existing), "name": existing.repo_id},
                )
            repo = self._create_repo(repo_type, repo_id, private, tok.user)
        return self._json({"url": self._repo_url(repo), "name": repo_id, "id": repo.uid})

    def _h_delete_repo(self, ctx: _Ctx) -> _Resp:
        tok = self._require_token(ctx)
        payload = ctx.json()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or tok.user}/{payload.get('name')}"
        with self._lock:
            repo = self._get_repo(ctx, repo_type, repo_id, write=True)
            del self._repos[(repo_type, repo_id.lower())]
            shutil.rmtree(repo.path, ignore_errors=True)
        return self._json({})

    def _h_validate_yaml(self, ctx: _Ctx) -> _Resp:
        body = ctx.json()
        errors = _card_metadata_errors(body.get("content", "") if isinstance(body, dict) else "")
        if errors:
            return self._json({"errors": [{"message": e} for e in errors]}, 400)
        return self._json({"errors": [], "warnings": []})

    def _h_repo_info(self, ctx: _Ctx) -> _Resp:
        repo_type, repo_id = self._api_repo(ctx)
        with self._lock:
            repo = self._get_repo(ctx, repo_type, repo_id)
            rev = self._split_rev(ctx.segs[5:])[0] if len(ctx.segs) > 5 else "main"
            sha = self._resolve(repo, rev)
            commit = repo.commits[sha]
            blobs = ctx.flag("blobs")
            siblings = []
            for path, entry in sorted(commit["files"].items()):
                sibling: dict[str, Any] = {"rfilename": path}
                if blobs:
                    sibling.update(size=entry["size"], blobId=entry["oid"])
                    if entry["lfs"]:
                        lfs = entry["lfs"]
                        sibling["lfs"] = {
                            "size": lfs["size"],
                            "sha256": lfs["sha256"],
                            "pointerSize": lfs["pointerSize"],
                        }
                siblings.append(sibling)
            info: dict[str, Any] = {
                "_id": repo.uid,
                "id": repo.repo_id,
                "author": repo.namespace,
                "sha": sha,
                "lastModified": commit["date"],
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "usedStorage": sum(e["size"] for e in commit["files"].values()),
            }
            if repo_type == "model":
                info["modelId"] = repo.repo_id
        return self._json(info)

    def _h_settings(self, ctx: _Ctx) -> _Resp:
        repo_type, repo_id = self._api_repo(ctx)
        payload = ctx.json()
        with self._lock:
            repo = self._get_repo(ctx, repo_type, repo_id, write=True)
            if "private" in payload:
                repo.private = bool(payload["private"])
            if payload.get("visibility") in ("private", "public"):
                repo.private = payload["visibility"] == "private"
            self._save_meta(repo)
        return self._json({})

    # ---------------------------------------------------------------- endpoints: listing

    def _h_tree(self, ctx: _Ctx) -> _Resp:
        repo_type, repo_id = self._api_repo(ctx)
        rev, path_parts = self._split_rev(ctx.segs[5:])
        path = "/".join(path_parts).strip("/")
        recursive, expand = ctx.flag("recursive"), ctx.flag("expand")
        with self._lock:
            repo = self._get_repo(ctx, repo_type, repo_id)
            sha = self._resolve(repo, rev)
            files = repo.commits[sha]["files"]
            dirs = self._dirs(files)
            if path and path not in dirs:
                raise HubError(404, f'{path} does not exist on "{rev}"', "EntryNotFound", {"X-Repo-Commit": sha})
            prefix = path + "/" if path else ""

            def wanted(p: str) -> bool:
                return p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])

            items = [self._dir_info(files, d) for d in sorted(dirs) if wanted(d)]
            items += [self._file_info(repo, p, e, expand, sha) for p, e in sorted(files.items()) if wanted(p)]
        return self._paginate(ctx, items, 50 if expand else self.page_size)

    def _h_paths_info(self, ctx: _Ctx) -> _Resp:
        repo_type, repo_id = self._api_repo(ctx)
        rev = self._split_rev(ctx.segs[5:])[0]
        raw = ctx.body.read_all()
        if raw.lstrip().startswith(b"{"):
            payload = json.loads(raw)
            paths, expand = payload.get("paths") or [], bool(payload.get("expand"))
        else:
            form = parse_qs(raw.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), (form.get("expand") or ["false"])[-1].lower() in ("1", "true")
        if isinstance(paths, str):
            paths = [paths]
        with self._lock:
            repo = self._get_repo(ctx, repo_type, repo_id)
            sha = self._resolve(repo, rev)
            files = repo.commits[sha]["files"]
            dirs = self._dirs(files)
            out = []
            for path in paths:
                path = path.strip("/")
                if path in files:
                    out.append(self._file_info(repo, path, files[path], expand, sha))
                elif path in dirs:
                    out.append(self._dir_info(files, path))
        return self._json(out)

    def _h_refs(self, ctx: _Ctx) -> _Resp:
        repo_type, repo_id = self._api_repo(ctx)
        with self._lock:
            repo = self._get_repo(ctx, repo_type, repo_id)
            data: dict[str, Any] = {
                "branches": [
                    {"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo.branches.items()
                ],
                "converts": [],
                "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": s} for t, s in repo.tags.items()],
            }
            if ctx.flag("include_prs"):
                data["pullRequests"] = [
                    {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": s}
                    for n, s in sorted(repo.prs.items())
                ]
        return self._json(data)

    def _h_list_commits(self, ctx: _Ctx) -> _Resp:
        repo_type, repo_id = self._api_repo(ctx)
        rev = self._split_rev(ctx.segs[5:])[0]
        formatted = "formatted" in ctx.query.get("expand[]", [])
        with self._lock:
            repo = self._get_repo(ctx, repo_type, repo_id)
            sha: str | None = self._resolve(repo, rev)
            items = []
            while sha:
                c = repo.commits[sha]
                item: dict[str, Any] = {
                    "id": c["id"],
                    "title": c["title"],
                    "message": c["message"],
                    "authors": [{"user": c["author"], "avatar": ""}],
                    "date": c["date"],
                }
                if formatted:
                    item["formatted"] = {"title": c["title"], "message": c["message"]}
                items.append(item)
                sha = c["parents"][0] if c["parents"] else None
        return self._paginate(ctx, items, self.page_size)

    # ---------------------------------------------------------------- endpoints: refs

    def _h_create_branch(self, ctx: _Ctx) -> _Resp:
        repo_type, repo_id = self._api_repo(ctx)
        branch = "/".join(ctx.segs[5:])
        payload = ctx.json()
        with self._lock:
            repo = self._get_repo(ctx, repo_type, repo_id, write=True)
            if (
                not branch
                or branch.startswith(("refs/", "/"))
                or ".." in branch
                or " " in branch
                or branch.endswith("/")
            ):
                raise HubError(400, f"Invalid branch name: {branch!r}")
            if branch in repo.branches:
                raise HubError(409, "Reference already exists")
            start = payload.get("startingPoint")
            repo.branches[branch] = self._resolve(repo, start) if start else repo.branches["main"]
            self._save_meta(repo)
        return self._json({})

    def _h_delete_branch(self, ctx: _Ctx) -> _Resp:
        repo_type, repo_id = self._api_repo(ctx)
        branch = "/".join(ctx.segs[5:])
        with self._lock:
            repo = self._get_repo(ctx, repo_type, repo_id, write=True)
            if branch == "main":
                raise HubError(400, "Cannot delete the default branch")
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            del repo.branches[branch]
            self._save_meta(repo)
        return self._json({})

    def _h_create_tag(self, ctx: _Ctx) -> _Resp:
        repo_type, repo_id = self._api_repo(ctx)
        rev = self._split_rev(ctx.segs[5:])[0]
        payload = ctx.json()
        tag = payload.get("tag") or ""
        with self._lock:
            repo = self._get_repo(ctx, repo_type, repo_id, write=True)
            if not tag or tag.startswith("refs/") or " " in tag:
                raise HubError(400, f"Invalid tag name: {tag!r}")
            if tag in repo.tags:
                raise HubError(409, "Tag already exists")
            repo.tags[tag] = self._resolve(repo, rev)
            self._save_meta(repo)
        return self._json({})

    def _h_delete_tag(self, ctx: _Ctx) -> _Resp:
        repo_type, repo_id = self._api_repo(ctx)
        tag = "/".join(ctx.segs[5:])
        with self._lock:
            repo = self._get_repo(ctx, repo_type, repo_id, write=True)
            if tag not in repo.tags:
                raise HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
            del repo.tags[tag]
            self._save_meta(repo)
        return self._json({})

    # ---------------------------------------------------------------- endpoints: upload

    def _branch_head(self, repo: _Repo, rev: str) -> str:
        """Head commit of the branch/PR a write goes to (RevisionNotFound if none, 400 on a tag or commit)."""
        branch = rev[len("refs/heads/") :] if rev.startswith("refs/heads/") else rev
        pr = _PR_RE.fullmatch(rev)
        if pr:
            if int(pr.group(1)) not in repo.prs:
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return repo.prs[int(pr.group(1))]
        if branch in repo.branches:
            return repo.branches[branch]
        if self.auto_create_branches:
            return repo.branches["main"]
        self._resolve(repo, rev)  # raises RevisionNotFound when unknown
        raise HubError(400, f"Cannot commit to {rev}: not a branch nor a pull request ref")

    def _h_preupload(self, ctx: _Ctx) -> _Resp:
        repo_type, repo_id = self._api_repo(ctx)
        rev = self._split_rev(ctx.segs[5:])[0]
        create_pr = ctx.flag("create_pr")
        payload = ctx.json()
        with self._lock:
            repo = self._get_repo(ctx, repo_type, repo_id, write=True, pr=create_pr or bool(_PR_RE.fullmatch(rev)))
            head = self._branch_head(repo, rev)
            tree = repo.commits[head]["files"]
            gitignore = payload.get("gitIgnore")
            if gitignore is None and ".gitignore" in tree:
                gitignore = self._blob_path(repo, tree[".gitignore"]).read_text(errors="replace")
            ignore = _pattern_lines(gitignore or "")
            out = []
            for f in payload.get("files") or []:
                path, size = f.get("path"), f.get("size")
                if not isinstance(path, str) or not _valid_path(path) or not isinstance(size, int):
                    raise HubError(400, f"Invalid file in preupload payload: {f!r}")
                try:
                    sample = base64.b64decode(f.get("sample") or "")
                except (binascii.Error, ValueError) as err:
                    raise HubError(400, "Invalid sample encoding") from err
                lfs = self._is_lfs(repo, tree, path, size, sample)
                existing = tree.get(path)
                oid = None
                if existing is not None:
                    oid = existing["lfs"]["sha256"] if existing["lfs"] else existing["oid"]
                out.append(
                    {
                        "path": path,
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": any(_path_matches(p, path) for p in ignore if not p.startswith("!")),
                        "oid": oid,
                    }
                )
        return self._json({"files": out, "commitOid": head})

    def _h_lfs_batch(self, ctx: _Ctx) -> _Resp:
        repo_type = _PREFIX_TO_TYPE.get(ctx.segs[0], "model")
        rest = ctx.segs[1:] if ctx.segs[0] in _PREFIX_TO_TYPE else ctx.segs
        repo_id = f"{rest[0]}/{rest[1][: -len('.git')]}"
        payload = ctx.json()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' operation is supported by the fake Hub")
        ref = (payload.get("ref") or {}).get("name")
        transfers = payload.get("transfers") or ["basic"]
        if "basic" not in transfers:
            raise HubError(400, f"Unsupported transfers {transfers}: only 'basic' is supported")
        objects = []
        with self._lock:
            # No ref: the client is preparing a pull request (readers may open one).
            repo = self._get_repo(ctx, repo_type, repo_id, write=True, pr=ref is None or bool(_PR_RE.fullmatch(ref)))
            for obj in payload.get("objects") or []:
                oid, size = obj.get("oid"), obj.get("size")
                if not isinstance(oid, str) or not _OID256_RE.fullmatch(oid) or not isinstance(size, int) or size < 0:
                    objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                                    "error": {"code": 422, "message": "Invalid oid or size"}})  # fmt: skip
                    continue
                stored = repo.path / "lfs" / oid
                if stored.exists() and stored.stat().st_size == size:
                    objects.append({"oid": oid, "size": size, "authenticated": True})
                    continue
                upload_id = secrets.token_urlsafe(16)
                self._uploads[upload_id] = ((repo_type, repo_id.lower()), oid, size)
                verify = f"{self.endpoint}/{_URL_PREFIX[repo_type]}{repo.repo_id}.git/info/lfs/objects/verify"
                objects.append(
                    {
                        "oid": oid,
                        "size": size,
                        "authenticated": True,
                        "actions": {
                            "upload": {"href": f"{self.endpoint}/__fake_s3/{upload_id}", "expires_in": 86400},
                            "verify": {"href": verify, "expires_in": 86400},
                        },
                    }
                )
        return self._json(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            content_type="application/vnd.git-lfs+json",
        )

    def _h_lfs_upload(self, ctx: _Ctx) -> _Resp:
        """The presigned 'S3' PUT of the basic LFS transfer: no auth, content checked against oid and size."""
        with self._lock:
            target = self._uploads.get(ctx.segs[1])
            repo = self._repos.get(target[0]) if target else None
        if target is None or repo is None:
            raise HubError(403, "Request has expired or the signature does not match")
        _, oid, size = target
        lfs_dir = repo.path / "lfs"
        lfs_dir.mkdir(parents=True, exist_ok=True)
        digest, received = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=lfs_dir, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in ctx.body.iter():
                    digest.update(chunk)
                    received += len(chunk)
                    f.write(chunk)
            if received != size or digest.hexdigest() != oid:
                raise HubError(
                    400, f"Uploaded content does not match: got {received} bytes, sha256 {digest.hexdigest()}"
                )
            os.replace(tmp, lfs_dir / oid)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return _Resp(200, [("ETag", f'"{hashlib.md5(oid.encode()).hexdigest()}"')])

    def _h_lfs_verify(self, ctx: _Ctx) -> _Resp:
        repo_type = _PREFIX_TO_TYPE.get(ctx.segs[0], "model")
        rest = ctx.segs[1:] if ctx.segs[0] in _PREFIX_TO_TYPE else ctx.segs
        repo_id = f"{rest[0]}/{rest[1][: -len('.git')]}"
        payload = ctx.json()
        with self._lock:
            repo = self._get_repo(ctx, repo_type, repo_id)
            stored = repo.path / "lfs" / str(payload.get("oid"))
            if not stored.exists() or stored.stat().st_size != payload.get("size"):
                raise HubError(404, "Object not found")
        return self._json({"success": True})

    def _h_commit(self, ctx: _Ctx) -> _Resp:
        repo_type, repo_id = self._api_repo(ctx)
        rev = self._split_rev(ctx.segs[5:])[0]
        create_pr = ctx.flag("create_pr")
        lines = []
        for raw_line in ctx.body.read_all().splitlines():
            if raw_line.strip():
                try:
                    lines.append(json.loads(raw_line))
                except ValueError as err:
                    raise HubError(400, f"Invalid NDJSON line: {err}") from err
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit payload must be the header")
        header = lines[0].get("value") or {}
        title = header.get("summary") or ""
        if not title:
            raise HubError(400, "Commit summary is required")
        with self._lock:
            tok = ctx.token
            repo = self._get_repo(ctx, repo_type, repo_id, write=True, pr=create_pr or bool(_PR_RE.fullmatch(rev)))
            head = self._branch_head(repo, rev)
            parent_req = header.get("parentCommit")
            parent = head
            if parent_req:
                if create_pr:
                    parent = self._resolve(repo, parent_req)
                elif not head.startswith(parent_req):
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[parent]["files"])
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value") or {}
                path = value.get("path")
                if not isinstance(path, str) or not _valid_path(path.rstrip("/") if key == "deletedFolder" else path):
                    raise HubError(400, f"Invalid path in commit: {path!r}")
                if key == "file":
                    try:
                        content = value.get("content") or ""
                        data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                    except (binascii.Error, ValueError) as err:
                        raise HubError(400, f"Invalid base64 content for {path}") from err
                    if len(data) > self.lfs_threshold:
                        raise HubError(
                            400,
                            "Your push was rejected because it contains files larger than 10 MiB. "
                            f"Please use https://git-lfs.github.com/ to store large files ({path}).",
                        )
                    if b"\x00" in data[:512]:
                        raise HubError(400, f"Your push was rejected because it contains binary files ({path}).")
                    tree[path] = self._store_regular(repo, data)
                elif key == "lfsFile":
                    oid = str(value.get("oid"))
                    stored = repo.path / "lfs" / oid
                    if not _OID256_RE.fullmatch(oid) or not stored.exists():
                        raise HubError(
                            400,
                            f"Your push was rejected because an LFS pointer pointed to a file that does not exist "
                            f"({path}, oid {oid}).",
                        )
                    size = stored.stat().st_size
                    if value.get("size") is not None and value["size"] != size:
                        raise HubError(400, f"LFS object size mismatch for {path}")
                    tree[path] = self._lfs_entry(oid, size)
                elif key == "deletedFile":
                    if path not in tree:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del tree[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    removed = [p for p in tree if p.startswith(prefix)]
                    if not removed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in removed:
                        del tree[p]
                else:
                    raise HubError(400, f"Unknown commit operation key: {key!r}")
            if create_pr:
                num = repo.next_discussion
                repo.next_discussion += 1
                ref: tuple[str, Any] = ("pr", num)
            else:
                pr = _PR_RE.fullmatch(rev)
                branch = rev[len("refs/heads/") :] if rev.startswith("refs/heads/") else rev
                ref = ("pr", int(pr.group(1))) if pr else ("branch", branch)
            author = tok.user if tok else "anonymous"
            sha = self._write_commit(repo, ref, parent, tree, title, header.get("description") or "", author)
            pr_url = f"{self._repo_url(repo)}/discussions/{ref[1]}" if create_pr else None
        return self._json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self._repo_url(repo)}/commit/{sha}",
                "pullRequestUrl": pr_url,
                "hookOutput": "",
            }
        )

    # ---------------------------------------------------------------- endpoints: download

    def _h_resolve(self, ctx: _Ctx) -> _Resp:
        repo_type = _PREFIX_TO_TYPE.get(ctx.segs[0], "model")
        rest = ctx.segs[1:] if ctx.segs[0] in _PREFIX_TO_TYPE else ctx.segs
        repo_id = f"{rest[0]}/{rest[1]}"
        rev, path_parts = self._split_rev(rest[3:])
        path = "/".join(path_parts)
        with self._lock:
            repo = self._get_repo(ctx, repo_type, repo_id)
            sha = self._resolve(repo, rev)
            entry = repo.commits[sha]["files"].get(path)
            if entry is None:
                raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
            blob = self._blob_path(repo, entry)
        size = entry["size"]
        headers = [
            ("X-Repo-Commit", sha),
            ("Accept-Ranges", "bytes"),
            ("Content-Type", "application/octet-stream"),
            ("Content-Disposition", f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}"),
        ]
        if entry["lfs"]:
            etag = f'"{entry["lfs"]["sha256"]}"'
            headers += [("ETag", etag), ("X-Linked-Etag", etag), ("X-Linked-Size", str(size))]
        else:
            headers.append(("ETag", f'"{entry["oid"]}"'))
        range_header = ctx.headers.get("Range") if ctx.method == "GET" else None
        if range_header:
            m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", range_header)
            if not m or (not m.group(1) and not m.group(2)):
                raise HubError(416, "Invalid range", headers={"Content-Range": f"bytes */{size}"})
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start, end = max(size - int(m.group(2)), 0), size - 1
            if start >= size or start > end:
                raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
            return _Resp(206, headers, file=blob, offset=start, length=end - start + 1)
        return _Resp(200, headers, file=blob, offset=0, length=size)


# --------------------------------------------------------------------------------------------------------------------
# Pointing the (already imported) huggingface_hub client at a server
# --------------------------------------------------------------------------------------------------------------------


def patch_hf_client(mp: pytest.MonkeyPatch, endpoint: str, hf_home: str | Path) -> None:
    """Point the environment and the already-imported huggingface_hub at `endpoint`, caches under `hf_home`.

    Everything goes through `mp`, so `mp.undo()` (end of the fixture / MonkeyPatch.context) restores it all.
    """
    from huggingface_hub import constants

    endpoint = endpoint.rstrip("/")
    home = Path(hf_home)
    hub_cache, assets, xet = home / "hub", home / "assets", home / "xet"
    for d in (hub_cache, assets):
        d.mkdir(parents=True, exist_ok=True)
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(assets),
        "HF_XET_CACHE": str(xet),
    }
    for key, value in env.items():
        mp.setenv(key, value)
    for key in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "HF_OIDC_RESOURCE",
        "HUGGINGFACE_CO_STAGING",
        "HUGGINGFACE_HUB_CACHE",
        "HUGGINGFACE_ASSETS_CACHE",
    ):
        mp.delenv(key, raising=False)

    host = urlsplit(endpoint).hostname or "127.0.0.1"
    values: dict[str, Any] = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_OFFLINE": False,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "default_cache_path": str(hub_cache),
        "HF_ASSETS_CACHE": str(assets),
        "HUGGINGFACE_ASSETS_CACHE": str(assets),
        "default_assets_cache_path": str(assets),
        "HF_XET_CACHE": str(xet),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(home / ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_URL_HOSTS": frozenset(getattr(constants, "HF_URL_HOSTS", frozenset())) | {host},
    }
    for name, value in values.items():
        if hasattr(constants, name):
            mp.setattr(constants, name, value)

    # Names imported by value at import time elsewhere in the client.
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import _cache_manager

        if hasattr(_cache_manager, "HF_HUB_CACHE"):
            mp.setattr(_cache_manager, "HF_HUB_CACHE", str(hub_cache))
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import _cache_assets

        if hasattr(_cache_assets, "HF_ASSETS_CACHE"):
            mp.setattr(_cache_assets, "HF_ASSETS_CACHE", str(assets))
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import _http

        if hasattr(_http, "_HUB_ORIGINS"):
            mp.setattr(_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS) | {_http._url_origin(endpoint)})
    # The module-level functions (huggingface_hub.upload_folder, .create_repo, .whoami...) are bound methods of one
    # HfApi() built at import time, with the endpoint of that time.
    with contextlib.suppress(ImportError, AttributeError):
        from huggingface_hub import hf_api

        mp.setattr(hf_api.api, "endpoint", endpoint)
        mp.setattr(hf_api.api, "_whoami_cache", {})
    # HfFileSystem instances are cached by fsspec with the endpoint they were built with.
    _clear_hf_filesystem_cache()


@contextlib.contextmanager
def serve_fake_hub(
    root: str | Path | None = None, hf_home: str | Path | None = None, **kwargs: Any
) -> Iterator[FakeHub]:
    """Outside pytest fixtures: start a FakeHub and point huggingface_hub at it for the duration of the block."""
    import huggingface_hub

    with contextlib.ExitStack() as stack:
        hub = stack.enter_context(FakeHub(root, **kwargs))
        home = hf_home if hf_home is not None else stack.enter_context(tempfile.TemporaryDirectory(prefix="hf_home_"))
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        huggingface_hub.close_session()  # no pooled connection to a previous server
        stack.callback(huggingface_hub.close_session)
        stack.callback(_clear_hf_filesystem_cache)
        patch_hf_client(mp, hub.endpoint, home)
        yield hub


def _clear_hf_filesystem_cache() -> None:
    with contextlib.suppress(ImportError, AttributeError):
        import huggingface_hub

        huggingface_hub.HfFileSystem.clear_instance_cache()


@pytest.fixture
def fake_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """A running FakeHub (fresh per test) with huggingface_hub pointed at it; everything restored afterwards.

    Attributes: .endpoint, .tokens, .repo_path(repo_id), .commits(repo_id), .fail_next(...), .count(endpoint),
    .api(token) (a HfApi on the fake Hub), .commit_files(...) / .create_repo(...) to seed repos without HTTP.
    """
    base = tmp_path_factory.mktemp("fake_hub")
    with serve_fake_hub(base / "storage", base / "hf_home") as hub:
        yield hub
    # An exception inside a handler is a bug of the fake, not of the code under test: report it.
    assert not hub.server_errors, "fake Hub handler crashed:\n" + "\n".join(hub.server_errors)
