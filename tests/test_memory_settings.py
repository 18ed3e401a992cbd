"""The process-wide allocator settings: glibc accepts them (on Linux with glibc)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
@pytest.mark.parametrize("setting", ["share_one_malloc_arena", "return_freed_tensors_to_the_os"])
def test_glibc_accepts_the_setting(setting: str) -> None:
    # In a child: the settings are process-wide and must not leak into the test run.
    code = f"from mergekit_like.memory import {setting}; print({setting}())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
