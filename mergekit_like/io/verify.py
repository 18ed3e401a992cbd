"""Checking a checkpoint directory completely: structure, every tensor, values, checksums."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_like.errors import MergekitLikeError
from mergekit_like.io.checksums import CHECKSUMS, read_checksums, sha256_of
from mergekit_like.io.reader import Checkpoint, open_checkpoint


@dataclass
class VerifyReport:
    path: Path
    tensors: int = 0
    bytes_read: int = 0
    checksums: str = "absent"  # absent | ok | mismatch
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def nonfinite_count(tensor: torch.Tensor) -> int:
    """How many NaN or infinite values a floating tensor holds (0 for other dtypes)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    return int((~torch.isfinite(tensor.float() if tensor.element_size() == 1 else tensor)).sum().item())


def verify_checkpoint(path: str | Path, *, check_finite: bool = True, allow_pickle: bool = False) -> VerifyReport:
    """Validates the index and every header, reads every tensor, optionally checks values are
    finite, and checks the shards against ``checksums.sha256`` when the directory has one."""
    report = VerifyReport(Path(path))
    try:
        checkpoint = open_checkpoint(path, allow_pickle=allow_pickle)
    except MergekitLikeError as exc:
        report.problems.append(str(exc))
        return report
    with checkpoint:
        _read_everything(checkpoint, report, check_finite)
        if checkpoint.layout.format == "safetensors":
            _check_sums(checkpoint, report)
    return report


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


def _check_sums(checkpoint: Checkpoint, report: VerifyReport) -> None:
    root = checkpoint.layout.root
    try:
        expected = read_checksums(root)
    except ValueError as exc:
        report.problems.append(str(exc))
        report.checksums = "mismatch"
        return
    if expected is None:
        return
    report.checksums = "ok"
    listed = set(expected)
    for file in checkpoint.files:
        if file.name not in listed:
            report.problems.append(f"{file}: not listed in {CHECKSUMS}")
            report.checksums = "mismatch"
    for name, digest in expected.items():
        target = root / name
        if not target.exists():
            report.problems.append(f"{target}: listed in {CHECKSUMS} but missing")
        elif not target.is_file():  # a FIFO would block the read below forever
            report.problems.append(f"{target}: listed in {CHECKSUMS} but not a regular file")
        elif sha256_of(target) != digest:
            report.problems.append(f"{target}: sha256 differs from {CHECKSUMS}; the file changed or is corrupt")
        else:
            continue
        report.checksums = "mismatch"
