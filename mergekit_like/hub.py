"""The Hugging Face Hub: inputs by repo id, and pushing results with their model card.

Built on ``huggingface_hub``: inputs are fetched with ``snapshot_download``
(weights, index, config and tokenizer files only; never pickles unless
allowed) into the normal cache; outputs are validated, then pushed with
``create_repo(exist_ok=True)`` and one ``upload_folder`` commit. Re-running an
interrupted push re-sends only what is missing and makes no extra commit
(the client skips files whose content the Hub already has). Tokens come from
the caller, ``HF_TOKEN`` or the saved login; they are never printed, logged,
or written into a card or recipe.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mergekit_like import __version__
from mergekit_like.errors import (
    HubAuthError,
    HubError,
    HubNetworkError,
    HubNotFoundError,
    InvalidCheckpointError,
    InvalidRepoIdError,
)
from mergekit_like.io.atomic import OLD_MARK, TEMP_MARK
from mergekit_like.io.reader import open_checkpoint

logger = logging.getLogger(__name__)

LIBRARY = "mergekit-like"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
PICKLE_PATTERNS = ["*.bin", "*.bin.index.json"]
SIDE_PATTERNS = [
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
    "vocab.*", "merges.txt", "*.model", "chat_template.*", "preprocessor_config.json", "README.md",
]
T = TypeVar("T")


def is_hub_id(ref: str) -> bool:
    """``org/name`` (optionally ``@revision``) that is not an existing local path."""
    return bool(_HUB_ID.match(ref)) and not Path(ref).exists()


def split_ref(ref: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``)."""
    repo_id, _, revision = ref.partition("@")
    return repo_id, revision or None


@dataclass(frozen=True)
class ResolvedInput:
    """Where an input was found: a local path, or a Hub repo at a commit."""

    ref: str
    path: Path
    repo_id: str | None = None
    commit: str | None = None


def resolve_input(ref: str, *, allow_pickle: bool = False, token: str | None = None) -> ResolvedInput:
    """A local path as it is (local paths win), or a Hub repo id fetched into the cache."""
    if not is_hub_id(ref):
        return ResolvedInput(ref, Path(ref))
    from huggingface_hub import snapshot_download

    repo_id, revision = split_ref(ref)
    patterns = WEIGHT_PATTERNS + SIDE_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    path = _calling_hub(repo_id, lambda: snapshot_download(
        repo_id, revision=revision, allow_patterns=patterns, token=token,
        library_name=LIBRARY, library_version=__version__,
    ), token)
    return ResolvedInput(ref, Path(path), repo_id, Path(path).name)


class ModelResolver:
    """Resolves the engine's model references, remembering what it fetched (for the model card)."""

    def __init__(self, *, allow_pickle: bool = False, token: str | None = None) -> None:
        self.allow_pickle = allow_pickle
        self.token = token
        self.resolved: dict[str, ResolvedInput] = {}

    def __call__(self, ref: str) -> Path:
        if ref not in self.resolved:
            self.resolved[ref] = resolve_input(ref, allow_pickle=self.allow_pickle, token=self.token)
        return self.resolved[ref].path


def model_resolver(*, allow_pickle: bool = False, token: str | None = None) -> ModelResolver:
    return ModelResolver(allow_pickle=allow_pickle, token=token)


# -- pushing ------------------------------------------------------------------------


def validate_for_push(directory: str | Path) -> list[str]:
    """Every reason ``directory`` must not be pushed (empty when it is fine)."""
    directory = Path(directory)
    if not directory.is_dir():
        return [f"{directory} is not a directory"]
    if TEMP_MARK in directory.name or OLD_MARK in directory.name or directory.name.startswith("."):
        return [f"{directory} is a temporary directory of an unfinished run; push the finished output"]
    problems = []
    try:
        with open_checkpoint(directory) as checkpoint:
            if not len(checkpoint):
                problems.append(f"{directory} holds no tensors")
    except (InvalidCheckpointError, FileNotFoundError, ValueError, PermissionError) as exc:
        problems.append(str(exc))
    leftovers = [p.name for p in directory.rglob("*") if TEMP_MARK in p.name or OLD_MARK in p.name]
    if leftovers:
        problems.append(f"{directory} holds leftovers of an interrupted run ({', '.join(leftovers[:3])})")
    problems += _card_problems(directory)
    return problems


def _card_problems(directory: Path) -> list[str]:
    from huggingface_hub import ModelCard

    readme = directory / "README.md"
    if not readme.is_file():
        return [f"{directory} has no README.md model card (every mergekit-like output writes one)"]
    try:
        card = ModelCard.load(readme)
    except Exception as exc:  # any failure to parse means an invalid card
        return [f"{readme}: the model card's YAML front matter is invalid ({_first_line(exc)})"]
    try:
        # The Hub's own metadata check; it answers 400 (a ValueError here) for a card it would refuse.
        _calling_hub("validate-yaml", lambda: card.validate(repo_type="model"))
    except ValueError as exc:
        if isinstance(exc, HubError):
            raise
        return [f"{readme}: the model card's YAML front matter is invalid ({_first_line(exc)})"]
    return []


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str
    commit_url: str | None
    pr_url: str | None


def push(
    directory: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
) -> PushResult:
    """Validates ``directory`` and uploads it to ``repo_id`` in one commit."""
    from huggingface_hub import HfApi

    directory = Path(directory)
    _check_repo_id(repo_id)
    problems = validate_for_push(directory)
    if problems:
        raise HubError("; ".join(problems), path=directory, fix="fix the output, or re-run the command that made it")
    api = HfApi(token=token, library_name=LIBRARY, library_version=__version__)
    _calling_hub(repo_id, lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"), token)
    if revision and revision != "main" and not create_pr:
        _calling_hub(repo_id, lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), token)
    message = commit_message or f"Upload {directory.name} with mergekit-like {__version__}"
    info: Any = _calling_hub(repo_id, lambda: api.upload_folder(
        repo_id=repo_id, folder_path=directory, revision=revision, commit_message=message,
        create_pr=create_pr, ignore_patterns=[".*", "**/.*"],
    ), token)
    return PushResult(repo_id, revision or "main", getattr(info, "commit_url", None), getattr(info, "pr_url", None))


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    try:
        if "/" not in repo_id:
            raise ValueError("it needs a namespace: ORG/NAME")
        validate_repo_id(repo_id)
    except ValueError as exc:  # HFValidationError is a ValueError
        raise InvalidRepoIdError(
            f"'{repo_id}' is not a valid repo name ({_first_line(exc)})",
            fix="use ORG/NAME with letters, digits, '-', '_' and '.' (at most 96 characters)",
        ) from None


def _calling_hub(repo_id: str, call: Callable[[], T], token: str | None = None) -> T:
    """Runs a Hub call, turning its failures into one clear error each (never showing the token)."""
    from huggingface_hub import errors

    has_token = bool(token) or _token_available()
    try:
        return call()
    except errors.HFValidationError as exc:
        raise InvalidRepoIdError(f"'{repo_id}' is not a valid repo id ({_first_line(exc)})") from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.RemoteEntryNotFoundError) as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401 and not has_token:
            raise _auth_error(repo_id, 401, has_token) from None
        raise HubNotFoundError(
            f"{repo_id}: not found on the Hub ({_first_line(exc)})",
            fix="check the name and revision; private repos need a token with access",
        ) from None
    except errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise _auth_error(repo_id, status, has_token) from None
        raise HubNetworkError(
            f"{repo_id}: the Hub answered {status or 'an error'} ({_first_line(exc)})",
            fix="retry later; a re-run uploads only what is missing",
        ) from None
    except Exception as exc:
        if isinstance(exc, HubError) or not _is_transport_error(exc):
            raise
        raise HubNetworkError(
            f"{repo_id}: cannot reach the Hub at {_endpoint()} ({type(exc).__name__})",
            fix="check the network (or HF_ENDPOINT); a re-run uploads only what is missing",
        ) from None


def _is_transport_error(exc: BaseException) -> bool:
    """Connection refused, reset or timed out, from the OS or from the client's HTTP library."""
    if isinstance(exc, (OSError, ConnectionError, TimeoutError)):
        return True
    module = type(exc).__module__.split(".")[0]
    return module in ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def _auth_error(repo_id: str, status: int, has_token: bool) -> HubAuthError:
    if status == 401 or not has_token:
        return HubAuthError(
            f"{repo_id}: the Hub needs a valid token (HTTP {status})",
            fix="set HF_TOKEN, run `hf auth login`, or pass --token",
        )
    return HubAuthError(
        f"{repo_id}: this token may not write there (HTTP {status})",
        fix="use a token with write access to the namespace, or push under your own namespace",
    )


def _token_available() -> bool:
    from huggingface_hub import get_token

    return bool(os.environ.get("HF_TOKEN") or get_token())


def _endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
