"""Handing freed heap memory back to the operating system (glibc or jemalloc on Linux; a no-op elsewhere).

glibc's ``malloc`` keeps memory a process frees for reuse: a CPU training step
allocates and frees many activation tensors of a few MiB (below glibc's dynamic
mmap threshold, which climbs to 32 MiB once large blocks are freed), and their
pages stay in the resident set after the step, free but not returned. The next
step, with other sequence lengths, fits its tensors around them only partly, so the
process's resident set, and its peak, grow with heap it does not use (on the default
model's int8 training, 2.1 GiB held between steps, 0.86 GiB once trimmed:
benchmarks/RESULTS.md, "int8_schemes"). :func:`return_freed_memory` asks glibc
to give those pages back (``malloc_trim(0)``, which since glibc 2.8 also releases
whole free pages inside the heap, not only at its top). The call takes a few
milliseconds; the real cost comes later: every page handed back is faulted in (and
zeroed) again when the heap reuses it, about 0.35 ms per MiB on the benchmark machine.

Within one step the same happens on a smaller scale: a forward pass frees each
layer's temporaries between the activations it keeps for backward, and the holes
they leave stay resident. :func:`return_freed_memory_during` also returns them a
few times during the forward pass (after every 10th of the default model's 30
decoder layers). On the default model's int8 training both together lowered the
peak RSS from 0.66x / 0.61x PEFT fp32's to 0.45x / 0.42x, and made the step 9-17%
slower (lorakit fp32: 4-10%), the re-faulted pages (benchmarks/RESULTS.md,
"int8_schemes", "End to end"). Capping glibc's mmap threshold instead
(``mallopt(M_MMAP_THRESHOLD, 1 MiB)``) lowered the peak as far but faults in every
large tensor (2 ms for each 6 MiB one): steps about 25% slower.

Where jemalloc is the process's allocator (``lorakit train`` preloads it when it finds
it: :mod:`lorakit.allocator`), the same calls ask jemalloc to purge its unused pages
(``arena.<all>.purge``); jemalloc also returns pages on its own after a while unused,
which is why it peaks lower than glibc without these calls.

Other C libraries (musl, macOS, Windows) have no ``malloc_trim``: the memory is
reused, just not returned, and the function returns False without error.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from .allocator import active_allocator, purge_jemalloc

__all__ = ["FORWARD_RELEASES", "return_freed_memory", "can_return_freed_memory", "return_freed_memory_during"]

FORWARD_RELEASES = 3  # per forward pass: 3 lowered the peak as far as 6 (backward then sets it) at half the cost


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
    """Whether :func:`return_freed_memory` can do anything here (glibc or jemalloc on Linux).

    Returns:
        True where jemalloc is loaded or glibc's ``malloc_trim`` was found.
    """
    return active_allocator() == "jemalloc" or _malloc_trim() is not None


def return_freed_memory() -> bool:
    """Return the heap memory this process has freed to the operating system.

    glibc: ``malloc_trim(0)``; jemalloc (preloaded): a purge of every arena. Live
    allocations are untouched; only whole free pages of the heap leave the resident
    set. Where neither is there, nothing happens.

    Returns:
        True when glibc released some memory or jemalloc purged; False when there was nothing or it cannot.
    """
    if active_allocator() == "jemalloc":
        return purge_jemalloc()
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def return_freed_memory_during(layers: Sequence[nn.Module], times: int = FORWARD_RELEASES) -> list[RemovableHandle]:
    """Return freed heap to the OS ``times`` times during each forward pass over ``layers`` (forward hooks).

    Args:
        layers: The decoder layers, in the order the forward pass runs them.
        times: How many returns per forward pass: after every ``ceil(len(layers) / times)``-th layer.

    Returns:
        The hooks' handles (``.remove()`` undoes it); none where memory cannot be returned (not glibc).
    """
    if not can_return_freed_memory() or not layers:
        return []
    every = max(1, math.ceil(len(layers) / max(times, 1)))
    return [layer.register_forward_hook(_after_forward) for layer in list(layers)[every - 1 :: every]]


def _after_forward(module: nn.Module, args: Any, output: Any) -> None:
    return_freed_memory()
