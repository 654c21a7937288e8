"""The gradient-checkpointing rerun, and the modules whose output it need not compute.

Non-reentrant checkpointing reruns a layer's forward during backward to rebuild
what backward saved. Some modules' outputs are not read in that rerun: in a
Llama-style decoder layer the MLP's output only feeds the residual add, which
saves nothing for backward, and LoRA's backward of ``down_proj`` needs its input
and the r-wide ``h Aᵀ``, never its output. Such a module can skip its frozen
output matmul while rerunning (the fused ops' ``compute_output=False``).

This module is the one place that knows about it:

* :func:`rerun_mode` / :func:`in_rerun`: the per-thread flag, entered by the
  checkpoint's recompute context (:func:`lorakit.train.recompute.enable_checkpointing`);
* :func:`mark_output_unread` / :func:`is_marked` / :func:`unmark_all`: which
  modules are known to have an unread output (set by ``train.recompute`` after
  checking the layer's layout);
* :func:`output_unread`: the question a forward asks (``lorakit.layers``'s
  ``LoraLinear``, ``lorakit.fusion``'s fused SwiGLU): both at once.

A mark is a plain boolean attribute on the module: no parameter, no buffer, so
the state dict does not change; copies and pickles of the model keep it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from torch import nn

__all__ = ["rerun_mode", "in_rerun", "mark_output_unread", "is_marked", "unmark_all", "output_unread"]

_MARK = "_lorakit_skip_in_recompute"  # the attribute set on marked modules


class _RerunState(threading.local):
    active = False


_RERUN = _RerunState()


@contextlib.contextmanager
def rerun_mode() -> Iterator[None]:
    """Mark a gradient-checkpointing rerun (the forward recomputed during backward) on this thread.

    Nests, and restores the previous state on exit, also on an exception.

    Yields:
        None.
    """
    prev, _RERUN.active = _RERUN.active, True
    try:
        yield
    finally:
        _RERUN.active = prev


def in_rerun() -> bool:
    """True inside :func:`rerun_mode` on this thread.

    Returns:
        Whether a checkpointing rerun is in progress.
    """
    return _RERUN.active


def mark_output_unread(module: nn.Module) -> None:
    """Record that nothing reads ``module``'s output during a checkpointing rerun.

    Only mark a module whose output, in the rerun, feeds nothing backward saves
    (a residual add): its forward will then skip computing the output there.

    Args:
        module: The module to mark.
    """
    module.__dict__[_MARK] = True


def is_marked(module: nn.Module) -> bool:
    """Whether :func:`mark_output_unread` marked ``module``.

    Args:
        module: Any module.

    Returns:
        True if marked.
    """
    return module.__dict__.get(_MARK, False)


def unmark_all(model: nn.Module) -> None:
    """Drop the marks of ``model`` and all its submodules.

    Args:
        model: The root module.
    """
    for module in model.modules():
        module.__dict__.pop(_MARK, None)


def output_unread(module: nn.Module) -> bool:
    """True while a checkpointing rerun recomputes ``module`` and nothing will read its output.

    Args:
        module: The module whose forward asks.

    Returns:
        :func:`in_rerun` and :func:`is_marked` (``module``).
    """
    return _RERUN.active and module.__dict__.get(_MARK, False)
