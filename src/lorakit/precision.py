"""The dtype lorakit's autograd functions compute in, and autocast kept out of them.

Shared by :mod:`lorakit.ops`, :mod:`lorakit.swiglu` and :mod:`lorakit.losses`:
each picks its matmul dtype once with :func:`compute_dtype` (explicit, else the
active autocast dtype, else the input's) and then runs with autocast off
(:func:`no_autocast`), so every cast inside is an explicit ``.to(cd)``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["compute_dtype", "no_autocast"]


def compute_dtype(x: Tensor, explicit: torch.dtype | None) -> torch.dtype:
    """The dtype the matmuls run in.

    Args:
        x: The input; its device decides which autocast state is read.
        explicit: A dtype the caller asked for, or None.

    Returns:
        ``explicit`` if given, else the autocast dtype when autocast is on for
        ``x``'s device (and ``x`` is floating point), else ``x.dtype``.
    """
    if explicit is not None:
        return explicit
    dev = x.device.type
    if x.is_floating_point() and torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``device_type`` (a no-op where autocast does not exist).

    Args:
        device_type: ``"cpu"``, ``"cuda"``, ... (``tensor.device.type``).

    Returns:
        The context manager to enter.
    """
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
