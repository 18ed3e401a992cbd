"""The Hugging Face Hub: inputs by repo id, and pushing results with their model card.

Built on ``huggingface_hub``: inputs are fetched with ``snapshot_download``
(weights, index, config and tokenizer files only; never pickles unless
allowed) into the normal cache; outputs are validated, then pushed with
``create_repo(exist_ok=True)`` and one ``upload_folder`` commit. Re-running an
interrupted push re-sends only what is missing and makes no extra commit
(the client skips files whose content the Hub already has). Dropped
connections and 5xx answers are retried a few times with exponential backoff;
4xx answers never are. Tokens come from
the caller, ``HF_TOKEN`` or the saved login; they are never printed, logged,
or written into a card or recipe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
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
    MergekitLikeError,
)
from mergekit_like.io.atomic import OLD_MARK, TEMP_MARK
from mergekit_like.io.layout import resolve as resolve_layout
from mergekit_like.io.reader import open_checkpoint
from mergekit_like.io.safetensors_format import read_header

logger = logging.getLogger(__name__)

LIBRARY = "mergekit-like"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
PICKLE_PATTERNS = ["*.bin", "*.bin.index.json"]
SIDE_PATTERNS = [
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
    "vocab.*", "merges.txt", "*.model", "chat_template.*", "preprocessor_config.json", "README.md",
    "adapter_config.json",
]
T = TypeVar("T")

# Retries of one Hub call on a dropped connection or a 5xx answer: attempts in all, and the first wait (doubled
# each time: 1 + 2 + 4 s), long enough to ride out a brief outage, short enough that a dead network fails soon.
# Module-level so that tests can shorten the wait.
RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY_S = 1.0


def local_path(ref: str) -> Path | None:
    """The existing local path ``ref`` names, if any: ``ref`` itself, else ``ref`` without its ``@revision``."""
    if Path(ref).exists():  # a directory literally named "a@main" counts too
        return Path(ref)
    repo_id, revision = split_ref(ref)
    if revision is not None and Path(repo_id).exists():
        return Path(repo_id)
    return None


def is_hub_id(ref: str) -> bool:
    """``org/name`` (optionally ``@revision``) that names no existing local path (local paths win)."""
    return bool(_HUB_ID.match(ref)) and local_path(ref) is None


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


def resolve_input(
    ref: str, *, allow_pickle: bool = False, token: str | None = None, quiet: bool = False
) -> ResolvedInput:
    """A local path as it is (local paths win), or a Hub repo id fetched into the cache.

    ``quiet`` hides huggingface_hub's download progress bars (for ``--quiet`` / ``--json``).
    """
    if not is_hub_id(ref):
        return ResolvedInput(ref, _local_input(ref))
    from huggingface_hub import snapshot_download

    repo_id, revision = split_ref(ref)
    patterns = WEIGHT_PATTERNS + SIDE_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    with progress_bars_hidden(quiet):
        path = _calling_hub(repo_id, lambda: snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, token=token,
            library_name=LIBRARY, library_version=__version__,
        ), token, download=True)
    return ResolvedInput(ref, Path(path), repo_id, Path(path).name)


def _local_input(ref: str) -> Path:
    found = local_path(ref)
    if found is None:
        return Path(ref)  # missing: the reader names it in its error
    if found != Path(ref):
        logger.warning("%s: using the local directory %s; the revision after '@' does not apply to it", ref, found)
    return found


@contextlib.contextmanager
def progress_bars_hidden(hidden: bool = True) -> Iterator[None]:
    """Hides huggingface_hub's progress bars inside the block (when ``hidden``), as they were afterwards."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if not hidden or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


class ModelResolver:
    """Resolves the engine's model references, remembering what it fetched (for the model card)."""

    def __init__(self, *, allow_pickle: bool = False, token: str | None = None, quiet: bool = False) -> None:
        self.allow_pickle = allow_pickle
        self.token = token
        self.quiet = quiet
        self.resolved: dict[str, ResolvedInput] = {}

    def __call__(self, ref: str) -> Path:
        if ref not in self.resolved:
            self.resolved[ref] = resolve_input(ref, allow_pickle=self.allow_pickle, token=self.token,
                                               quiet=self.quiet)
        return self.resolved[ref].path


def model_resolver(*, allow_pickle: bool = False, token: str | None = None, quiet: bool = False) -> ModelResolver:
    """A resolver for ``planned_merge(resolve_model=...)``; ``quiet`` hides the download progress bars."""
    return ModelResolver(allow_pickle=allow_pickle, token=token, quiet=quiet)


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
        problems += _unindexed_problems(directory)
    except (InvalidCheckpointError, FileNotFoundError, ValueError, PermissionError) as exc:
        problems.append(str(exc))
    leftovers = [p.name for p in directory.rglob("*") if TEMP_MARK in p.name or OLD_MARK in p.name]
    if leftovers:
        problems.append(f"{directory} holds leftovers of an interrupted run ({', '.join(leftovers[:3])})")
    problems += _card_problems(directory)
    return problems


def _unindexed_problems(directory: Path) -> list[str]:
    """Tensors in the directory's shards that the index does not list.

    The reader only warns and skips them, so the pushed repo would hold weights that loaders ignore; a sign of an
    index written for other shards. Shards the index never names count too.
    """
    layout = resolve_layout(directory)
    if layout.weight_map is None or layout.format != "safetensors":
        return []
    shards = sorted(set(layout.files) | set(layout.root.glob("*.safetensors")))
    problems = []
    for shard in shards:
        unindexed = sorted(set(read_header(shard).tensors) - set(layout.weight_map))
        if unindexed:
            problems.append(
                f"{shard}: {len(unindexed)} tensor(s) are not in the index {layout.source.name} "
                f"(first: '{unindexed[0]}'); regenerate the index or remove the stray shard"
            )
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
        _calling_hub("validate-yaml", lambda: _validate_on_hub(str(card)))
    except ValueError as exc:
        if isinstance(exc, HubError):
            raise
        return [f"{readme}: the model card's YAML front matter is invalid ({_first_line(exc)})"]
    return []


def _validate_on_hub(card_text: str) -> None:
    """``ModelCard.validate``, but naming the tool in the user agent (the client's own call sends no such header).

    A card the Hub refuses raises ValueError (its answer); other failures raise the client's HTTP errors.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    # No token: validation is anonymous on the Hub, so the token is not sent where it is not needed.
    headers = {**build_hf_headers(token=False, library_name=LIBRARY, library_version=__version__),
               "Accept": "text/plain"}
    response = get_session().post(f"{constants.ENDPOINT}/api/validate-yaml",
                                  json={"repoType": "model", "content": card_text}, headers=headers)
    if response.status_code == 400:
        raise ValueError(response.text)
    hf_raise_for_status(response)


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
    quiet: bool = False,
) -> PushResult:
    """Validates ``directory`` and uploads it to ``repo_id`` in one commit (``quiet``: no progress bars)."""
    from huggingface_hub import HfApi

    directory = Path(directory)
    _check_repo_id(repo_id)
    if create_pr and revision not in (None, "main"):
        raise HubError(f"a pull request (--create-pr) is always opened against the default branch, so it cannot "
                       f"target revision '{revision}'", path=directory,
                       fix=f"drop --revision, or push to branch '{revision}' without --create-pr")
    problems = validate_for_push(directory)
    if problems:
        raise HubError("; ".join(problems), path=directory, fix="fix the output, or re-run the command that made it")
    api = HfApi(token=token, library_name=LIBRARY, library_version=__version__)
    _calling_hub(repo_id, lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"), token)
    if revision and revision != "main" and not create_pr:
        _calling_hub(repo_id, lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), token)
    message = commit_message or f"Upload {directory.name} with mergekit-like {__version__}"
    # Retrying the whole upload is safe on a branch: if a commit landed but its answer was lost, the retry finds
    # every file already there and commits nothing. A pull request is compared with its base instead, so a
    # retried commit would open a second one: there, a failed commit request is not retried.
    retryable = _is_transient if not create_pr else lambda exc: _is_transient(exc) and not _is_commit_request(exc)
    with progress_bars_hidden(quiet):
        info: Any = _calling_hub(repo_id, lambda: api.upload_folder(
            repo_id=repo_id, folder_path=directory, revision=revision, commit_message=message,
            create_pr=create_pr, ignore_patterns=[".*", "**/.*"],
        ), token, retryable=retryable)
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


def _calling_hub(
    repo_id: str, call: Callable[[], T], token: str | None = None, *,
    retryable: Callable[[BaseException], bool] | None = None, download: bool = False,
) -> T:
    """Runs a Hub call, retrying transient failures, then turning a failure into one clear error (never the token).

    ``retryable`` decides which failures are tried again (default: dropped connections and 5xx answers);
    ``download`` says the call fetches (its errors speak of the cache), else it sends.
    """
    retryable = retryable or _is_transient
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return call()
        except Exception as exc:
            if attempt == RETRY_ATTEMPTS or not retryable(exc):
                error = _hub_error(repo_id, exc, token, attempt, download=download)
                if error is exc:
                    raise
                raise error from None
            delay = RETRY_BASE_DELAY_S * 2 ** (attempt - 1)
            logger.warning("%s: the Hub call failed (%s); retrying in %.1f s (%d of %d)",
                           repo_id, _first_line(exc), delay, attempt + 1, RETRY_ATTEMPTS)
            time.sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _is_transient(exc: BaseException) -> bool:
    """A failure that a later attempt may not meet: a 5xx answer or a transport error; never a 4xx answer."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    exc = _cause(exc)
    # Offline mode, or a snapshot missing from the cache with nothing behind it: the same on every attempt.
    if isinstance(exc, (MergekitLikeError, LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return False
    status = _status_of(exc)
    if status is not None:
        return status >= 500
    return _is_transport_error(exc)


def _is_commit_request(exc: BaseException) -> bool:
    """Whether the failed request was (or may have been) the commit: it may have landed though its answer was lost."""
    url = _request_url(getattr(exc, "response", None)) or _request_url(exc)
    return url is None or "/commit/" in url


def _request_url(holder: object) -> str | None:
    """The URL of the request an httpx response or error belongs to (httpx raises when none is attached)."""
    try:
        request = getattr(holder, "request", None)
    except RuntimeError:
        return None
    url = getattr(request, "url", None)
    return str(url) if url is not None else None


def _cause(exc: BaseException) -> BaseException:
    """The failure behind ``snapshot_download``'s "cannot find a cached snapshot" error, which wraps it."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    while isinstance(exc, LocalEntryNotFoundError) and isinstance(exc.__cause__, Exception):
        exc = exc.__cause__
    return exc


def _status_of(exc: BaseException) -> int | None:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _hub_error(repo_id: str, exc: Exception, token: str | None, attempts: int, *,
               download: bool = False) -> Exception:
    """The one clear error for a failed Hub call, or ``exc`` itself when it is not a Hub failure."""
    from huggingface_hub import constants, errors

    cause = _cause(exc)
    rerun = "a re-run downloads only what is missing" if download else "a re-run uploads only what is missing"
    if download and constants.is_offline_mode() and isinstance(
            cause, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return HubNotFoundError(f"{repo_id}: not in the local cache, and HF_HUB_OFFLINE is set, so the Hub "
                                "was not asked", fix="unset HF_HUB_OFFLINE to download it, or use a local path")
    has_token = bool(token) or _token_available()
    status = _status_of(cause)
    tried = f" after {attempts} attempts" if attempts > 1 else ""
    if isinstance(cause, errors.HFValidationError):
        return InvalidRepoIdError(f"'{repo_id}' is not a valid repo id ({_first_line(cause)})")
    if isinstance(cause, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError,
                        errors.RemoteEntryNotFoundError)):
        if status == 401 and not has_token:
            return _auth_error(repo_id, 401, has_token)
        return HubNotFoundError(
            f"{repo_id}: not found on the Hub ({_first_line(cause)})",
            fix="check the name and revision; private repos need a token with access",
        )
    if isinstance(cause, errors.HfHubHTTPError):
        if status in (401, 403):
            return _auth_error(repo_id, status, has_token)
        return HubNetworkError(
            f"{repo_id}: the Hub answered {status or 'an error'}{tried} ({_first_line(cause)})",
            fix=f"retry later; {rerun}",
        )
    if isinstance(exc, MergekitLikeError) or not _is_transport_error(cause):
        return exc
    return HubNetworkError(
        f"{repo_id}: cannot reach the Hub at {_endpoint()}{tried} ({type(cause).__name__})",
        fix=f"check the network (or HF_ENDPOINT); {rerun}",
    )


def _is_transport_error(exc: BaseException) -> bool:
    """Connection refused, reset or timed out, from the OS or from the client's HTTP library.

    Other OS errors (a full disk, a file that vanished) are local: a retry cannot help and "cannot reach the Hub"
    would mislead, so they pass through.
    """
    from huggingface_hub.errors import LocalEntryNotFoundError

    # LocalEntryNotFoundError without a cause: the Hub was not asked (offline) and the cache lacks the snapshot.
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror, LocalEntryNotFoundError)):
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

    return without_credentials(str(constants.ENDPOINT))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return without_credentials(text[0]) if text else type(exc).__name__


_URL_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")


def without_credentials(text: str) -> str:
    """``text`` with the user and password of every URL in it removed (HF_ENDPOINT may hold them)."""
    return _URL_USERINFO.sub(r"\1", text)
