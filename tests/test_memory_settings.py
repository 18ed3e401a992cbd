"""The process-wide allocator settings: glibc accepts them (on Linux with glibc)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
@pytest.mark.parametrize("setting", ["share_one_malloc_arena", "return_freed_tensors_to_the_os", "keep_freed_memory"])
def test_glibc_accepts_the_setting(setting: str) -> None:
    # In a child: the settings are process-wide and must not leak into the test run.
    code = f"from mergekit_like.memory import {setting}; print({setting}())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


STREAM_FAULTS = """
import resource, sys, torch
from mergekit_like.memory import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
def stream(n):  # a reader's buffer and the float32 copy a merge makes of it, tensor after tensor
    for i in range(n):
        raw = torch.empty((20 << 20) + (i % 3 << 20), dtype=torch.bfloat16).fill_(1)
        widened = raw.float()
        del raw, widened
stream(10)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
stream(30)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_kept_memory_serves_later_tensors_without_page_faults() -> None:
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", STREAM_FAULTS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    # Tensors of 40 to 88 MiB: over glibc's largest mmap threshold, so by default each is a
    # fresh mapping, a fault per page; kept, they come from memory freed by earlier ones.
    pages = 30 * (80 << 20) // 4096
    assert faults("default") > pages // 2
    assert faults("keep") < pages // 5  # a few stray fresh blocks at most (seen: 0, or 51,200)
