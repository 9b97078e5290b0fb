"""Peak memory of one call, in bytes, from the kernel's own accounting (Linux).

`peak_extra_bytes(fn)` returns how much memory `fn()` touched beyond what the process held when
it started: the peak resident set during the call minus the resident set before it. Freed heap
is first handed back to the OS (`malloc_trim`) and the kernel's high-water mark is reset
(`/proc/self/clear_refs`, Linux 4.0+), so a temporary counts even where the allocator would
otherwise have reused pages that were already resident. It sees every allocator (torch, numpy,
the C codec, thread stacks), which Python's `tracemalloc` does not. Resident pages are counted
when touched, so a buffer allocated but never written costs nothing here, as on a real host.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _find_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None  # glibc only


_malloc_trim = _find_malloc_trim()


def _status_bytes(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if m is None:
        raise OSError(f"no {field} in {_STATUS}")
    return int(m.group(1)) * 1024


def available() -> bool:
    """Whether this process can measure peaks (Linux with a writable clear_refs, glibc)."""
    try:
        _CLEAR_REFS.write_text("5")
        _status_bytes("VmHWM")
    except OSError:
        return False
    return _malloc_trim is not None


def peak_extra_bytes(fn: Callable[[], T]) -> tuple[int, T]:
    """(bytes of memory `fn()` held at its peak beyond the process's resident set before it,
    fn's result). What `fn` returns is still alive when the peak is read, so it counts.
    OSError where the kernel's accounting or glibc's `malloc_trim` is missing (`available`)."""
    if _malloc_trim is None:
        raise OSError("malloc_trim is not available (not glibc)")
    _malloc_trim(0)
    _CLEAR_REFS.write_text("5")  # the high-water mark := the current resident set
    before = _status_bytes("VmRSS")
    result = fn()
    return max(0, _status_bytes("VmHWM") - before), result
