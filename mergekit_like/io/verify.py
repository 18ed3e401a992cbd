"""Checking a checkpoint directory completely: structure, every tensor, values, and its manifest.

The manifest (``checksums.sha256``) that every output of this tool carries lists every file
the tool wrote there, so `verify` fails a listed file that changed or went missing and a file
the manifest does not list. It guards against corruption and against changes made after the
output was written, not against someone who rewrites the manifest as well.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mergekit_like.errors import InvalidCheckpointError, MergekitLikeError, describe, os_error_words
from mergekit_like.io.checksums import CHECKSUMS, MANIFEST_FIX, read_checksums, sha256_of
from mergekit_like.io.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, open_regular_file
from mergekit_like.io.reader import Checkpoint, open_checkpoint
from mergekit_like.io.values import nonfinite_count

# The files by which an output of this tool is known (mergekit_like.card writes them); named
# here rather than imported, so the I/O layer does not depend on the card and recipe code.
RECIPE_FILE = "merge_recipe.yml"
CARD_FILE = "README.md"
CARD_TAG = "mergekit-like"
# The front matter, where the card's tags are, is at the top; the rest of a card is not needed.
CARD_HEAD_BYTES = 64 * 1024
# Entries that git and the Hugging Face Hub add to a repository (a clone, a download into a
# local folder); `push` never uploads them, and no loader reads them.
REPOSITORY_BOOKKEEPING = frozenset({".git", ".gitattributes", ".cache"})


@dataclass
class VerifyReport:
    path: Path
    tensors: int = 0
    bytes_read: int = 0
    checksums: str = "absent"  # absent | ok | mismatch | invalid (the manifest itself is broken)
    tool_output: bool = False  # looks like an output of this tool (see looks_like_tool_output)
    strict: bool = False  # a missing manifest is a problem
    unexpected: list[str] = field(default_factory=list)  # entries of the directory the manifest does not list
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def verifiable(self) -> bool:
        """Whether the files could be checked against a manifest (not only read)."""
        return self.checksums != "absent"


def verify_checkpoint(
    path: str | Path, *, check_finite: bool = True, allow_pickle: bool = False, strict: bool | None = None,
) -> VerifyReport:
    """Validates the index and every header, reads every tensor, optionally checks values are finite,
    and checks the directory against its manifest.

    With a manifest, every file it lists must be there, a regular file, with its sha256, and every
    entry of the directory must be listed (but :data:`REPOSITORY_BOOKKEEPING`). A manifest that is
    not a regular, well-formed file fails. Without one, ``strict`` fails the check; ``None`` (the
    default) means strict exactly when the directory looks like an output of this tool (see
    :func:`looks_like_tool_output`), so a checkpoint from elsewhere is checked for readability only.
    """
    report = VerifyReport(Path(path))
    root = _directory_of(report.path)
    report.tool_output = root is not None and looks_like_tool_output(root)
    report.strict = report.tool_output if strict is None else strict
    # An adapter is not a model (opening it as one is refused): its weights file is what is read.
    weights = root / ADAPTER_WEIGHTS if root is not None and os.path.lexists(root / ADAPTER_CONFIG) else path
    try:
        checkpoint = open_checkpoint(weights, allow_pickle=allow_pickle)
    except MergekitLikeError as exc:
        report.problems.append(str(exc))
    else:
        with checkpoint:
            _read_everything(checkpoint, report, check_finite)
    if root is not None:  # checked even when the weights do not open: a manifest says which file changed
        _check_manifest(root, report)
    return report


def looks_like_tool_output(directory: Path) -> bool:
    """Whether ``directory`` looks like an output this tool wrote, and so should hold a manifest.

    It does when it holds ``merge_recipe.yml`` (merge, soup and search write it) or a ``README.md``
    model card this tool generated (tagged ``mergekit-like`` in its front matter: merge, soup,
    average, extract-lora). Outputs of convert, consolidate and the training hook carry neither
    file; without their manifest they are taken for checkpoints from elsewhere unless ``strict``
    is asked for.
    """
    return os.path.lexists(directory / RECIPE_FILE) or _is_tool_card(directory / CARD_FILE)


def _is_tool_card(path: Path) -> bool:
    try:
        with os.fdopen(open_regular_file(path), "rb") as f:
            head = f.read(CARD_HEAD_BYTES).decode("utf-8", errors="replace")
    except (MergekitLikeError, OSError):  # no card, or not a file: not one this tool wrote
        return False
    opening, _, rest = head.partition("\n")
    front_matter, closed, _ = rest.partition("\n---")
    if opening.strip() != "---" or not closed:
        return False
    try:
        data = yaml.safe_load(front_matter)
    except yaml.YAMLError:
        return False
    tags = data.get("tags") if isinstance(data, dict) else None
    return isinstance(tags, list) and CARD_TAG in tags


def _directory_of(path: Path) -> Path | None:
    """The directory whose manifest covers ``path`` (a directory, or a file in it); None if nothing is there."""
    if path.is_dir():
        return path
    return path.parent if os.path.lexists(path) else None


def _read_everything(checkpoint: Checkpoint, report: VerifyReport, check_finite: bool) -> None:
    for entry in checkpoint.entries():
        try:
            tensor = checkpoint.read(entry.name)
        except MergekitLikeError as exc:
            report.problems.append(str(exc))
            continue
        report.tensors += 1
        report.bytes_read += entry.nbytes
        bad = nonfinite_count(tensor) if check_finite else 0
        if bad:
            report.problems.append(f"{entry.file}: tensor '{entry.name}': {bad} NaN or infinite values")


def _check_manifest(root: Path, report: VerifyReport) -> None:
    try:
        expected = read_checksums(root)
    except (MergekitLikeError, OSError) as exc:  # replaced by a folder, a FIFO, a device; a bad line
        report.problems.append(str(exc))
        report.checksums = "invalid"
        return
    if expected is None:
        _no_manifest(root, report)
        return
    report.checksums = "ok"
    for name, digest in expected.items():
        problem = _listed_file_problem(root / name, digest)
        if problem is not None:
            report.problems.append(problem)
            report.checksums = "mismatch"
    report.unexpected = _unlisted_entries(root, expected)
    for name in report.unexpected:
        report.problems.append(describe(
            root / name, None, f"not written by mergekit-like with this output: {CHECKSUMS} does not list it",
            "remove it if it does not belong to the model, or write the output again",
        ))
        report.checksums = "mismatch"


def _listed_file_problem(target: Path, digest: str) -> str | None:
    """What is wrong with a file the manifest lists; None when it is there, unchanged."""
    try:
        actual = sha256_of(target)  # refuses a non-regular file unopened: a FIFO would block
    except FileNotFoundError:  # nothing there, or a link to nothing
        return f"{target}: listed in {CHECKSUMS} but missing"
    except InvalidCheckpointError as exc:  # a folder, a FIFO, a device, or a link to one
        return f"{target}: listed in {CHECKSUMS} but {exc.what}"
    except OSError as exc:  # permission denied, too many open files: in words
        return f"{target}: listed in {CHECKSUMS} but cannot be read ({os_error_words(exc)[0]})"
    if actual != digest:
        return f"{target}: sha256 differs from {CHECKSUMS}; the file changed or is corrupt"
    return None


def _unlisted_entries(root: Path, listed: dict[str, str]) -> list[str]:
    """Every entry of ``root`` (file, folder or other) that the manifest does not list."""
    return sorted(name for name in os.listdir(root)
                  if name != CHECKSUMS and name not in listed and name not in REPOSITORY_BOOKKEEPING)


def _no_manifest(root: Path, report: VerifyReport) -> None:
    if not report.strict:
        return
    if report.tool_output:
        what = (f"{CHECKSUMS} is missing: this output of mergekit-like was written with one, and without it "
                "its files cannot be verified")
        fix = f"{MANIFEST_FIX}; or verify with --no-strict to check only that every tensor reads and is finite"
    else:
        what = f"{CHECKSUMS} is missing: with --strict, a checkpoint without a manifest cannot be verified"
        fix = "verify without --strict to check only that every tensor reads and is finite"
    report.problems.append(describe(root, None, what, fix))
