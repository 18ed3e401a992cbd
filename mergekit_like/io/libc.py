"""The C library calls Python has no wrapper for, loaded once; each is None where the system lacks it.

Used for allocator settings (``mallopt``), atomic directory swaps (``renameat2``),
early writeback (``sync_file_range``) and the sidecar's process name (``prctl``). Linux
with glibc has all four; elsewhere the callers fall back to portable behaviour.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def _library() -> Any:
    """The process's C library (errno kept for callers that read it), or None."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:  # no C library to load (not a POSIX system)
        return None


def _function(name: str, argtypes: list[Any], restype: Any = ctypes.c_int) -> Any:
    library = _library()
    function = getattr(library, name, None) if library is not None else None
    if function is not None:
        function.argtypes = argtypes
        function.restype = restype
    return function


@functools.cache
def mallopt() -> Any:
    """glibc's ``mallopt(param, value)``, or None."""
    return _function("mallopt", [ctypes.c_int, ctypes.c_int])


@functools.cache
def renameat2() -> Any:
    """``renameat2(olddirfd, old, newdirfd, new, flags)`` (glibc 2.28+), or None."""
    return _function("renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint])


@functools.cache
def sync_file_range() -> Any:
    """``sync_file_range(fd, offset, nbytes, flags)`` (Linux), or None."""
    return _function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])


@functools.cache
def prctl() -> Any:
    """Linux's ``prctl(option, arg2, arg3, arg4, arg5)``, or None."""
    return _function("prctl", [ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong])


def errno() -> int:
    """The errno of the last call made through this module."""
    return ctypes.get_errno()
