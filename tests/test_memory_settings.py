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


FAULTS_OF_A_REUSED_TENSOR = """
import resource, sys, torch
from mergekit_like.memory import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
torch.empty(16 << 20).fill_(1)  # 64 MiB, allocated, touched and freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(16 << 20).fill_(1)  # the same size again
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_kept_memory_serves_the_next_tensor_without_page_faults() -> None:
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REUSED_TENSOR, mode],
                             capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    pages = (64 << 20) // 4096
    assert faults("default") > pages // 2  # a fresh mapping: a fault per page (or per huge page group)
    assert faults("keep") < pages // 20
