"""Handing freed heap memory back to the operating system (glibc on Linux; a no-op elsewhere).

glibc's ``malloc`` keeps memory a process frees for reuse: a CPU training step
allocates and frees many activation tensors of a few MiB (below glibc's dynamic
mmap threshold, which climbs to 32 MiB once large blocks are freed), and their
pages stay in the resident set after the step, free but not returned. The next
step, with other sequence lengths, fits its tensors around them only partly, so the
process's resident set, and its peak, grow with heap it does not use (on the default
model's int8 training, 2.1 GiB held between steps, 0.86 GiB once trimmed:
benchmarks/RESULTS.md, "int8_schemes"). :func:`return_freed_memory` asks glibc
to give those pages back (``malloc_trim(0)``, which since glibc 2.8 also releases
whole free pages inside the heap, not only at its top). It costs a walk over the free
lists, about a millisecond after a training step.

Other C libraries (musl, macOS, Windows) have no ``malloc_trim``: the memory is
reused, just not returned, and the function returns False without error.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any

__all__ = ["return_freed_memory", "can_return_freed_memory"]


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim`` through ctypes, or None where there is none (looked up once per process)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim  # glibc's soname; musl's libc is libc.so and has no malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def can_return_freed_memory() -> bool:
    """Whether :func:`return_freed_memory` can do anything here (glibc on Linux).

    Returns:
        True where glibc's ``malloc_trim`` was found.
    """
    return _malloc_trim() is not None


def return_freed_memory() -> bool:
    """Return the heap memory this process has freed to the operating system (glibc's ``malloc_trim(0)``).

    Live allocations are untouched; only whole free pages of the heap (every arena)
    leave the resident set. Where the C library has no ``malloc_trim``, nothing happens.

    Returns:
        True when glibc released some memory; False when it had none to release or cannot.
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
