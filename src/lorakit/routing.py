"""Instance-level ``forward`` overrides: who replaced a module's forward, set and undone in one place.

Five parts of lorakit route a module's calls elsewhere without changing the
model's code, its module tree or its state dict:

============================  ===================  =========================================
owner (tag)                   modules              the override
============================  ===================  =========================================
``lorakit.layers``            LoRA wrappers        the base layer's own ``forward`` while every
                                                   active adapter is merged (no wrapper code
                                                   in the call path); dropped on any adapter
                                                   state change
``lorakit.fusion``            Llama-style MLPs     the fused SwiGLU op (``fuse_swiglu_mlps``)
``lorakit.norms``             RMSNorms             the output-saving norm (``route_rms_norms``)
``lorakit.train.graphs``      decoder layers       CUDA-graph replay (``LayerGraphs``)
``lorakit.few_rows``          the output head      ``(W·xᵀ)ᵀ`` for few rows on the CPU (inference
                                                   only: ``for_inference``, ``adapter_batch``,
                                                   ``generate``)
============================  ===================  =========================================

Each sets its override with :func:`set_forward`, undoes it with
:func:`remove_forward` (which only ever removes the caller's own) and asks
:func:`forward_owner`. Nothing else in lorakit touches a module's instance
``forward``.

Conflicts: :func:`set_forward` on a module whose forward is already replaced
(by another owner, by user code, reported as :data:`USER`, or by the same
owner) raises :class:`~lorakit.errors.ForwardConflictError`; an owner replacing
its own override removes it first. The one precedence rule: the merged-layer shortcut of
``lorakit.layers`` is an optimisation and steps aside, it is not installed on a
wrapper another owner routes.

Why instance overrides and not a swapped subclass (``module.__class__ = Fused``):
an instance attribute leaves ``type(module)`` alone, which transformers,
``isinstance`` checks, hooks and ``torch.compile`` guards rely on; it is undone
by deleting one attribute; two owners on different modules never compose
classes; and the model's own forward stays reachable as
``type(module).forward(module, ...)``, which every override falls back to.
``nn.Module.__call__`` looks ``self.forward`` up on the instance first, so the
override takes effect for every call, with hooks still running.

Overrides must pickle (``torch.save(model)`` and ``copy.deepcopy`` copy the
instance dict): pass a ``functools.partial`` of a module-level function or a
bound method, never a lambda or a closure. The owner tag is a string kept
next to the override; neither is a parameter or buffer, so the state dict is
unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .errors import ForwardConflictError

__all__ = ["USER", "set_forward", "remove_forward", "forward_owner"]

USER = "user code"  # the owner reported for an override lorakit did not set
_TAG = "_lorakit_forward_owner"  # instance attribute: (owner, the override it set)


def forward_owner(module: nn.Module) -> str | None:
    """Who replaced ``module``'s forward.

    Args:
        module: Any module.

    Returns:
        The owner tag given to :func:`set_forward`, :data:`USER` for an override
        set outside this module, or None when ``module`` runs its class's forward.
    """
    d = module.__dict__
    if "forward" not in d:
        return None
    tag = d.get(_TAG)
    return tag[0] if tag is not None and tag[1] is d["forward"] else USER


def set_forward(module: nn.Module, forward: Callable[..., Any], owner: str) -> None:
    """Route ``module``'s calls to ``forward`` on behalf of ``owner``.

    Args:
        module: The module to route.
        forward: Called instead of the class's forward, with the call's arguments
            (bind ``module`` into it yourself, e.g. ``functools.partial(fn, module)``).
            Must pickle: a partial or a bound method, not a lambda.
        owner: The owner's tag (by convention its module name, e.g. ``"lorakit.fusion"``).

    Raises:
        ForwardConflictError: the module's forward is already replaced, by another owner, by
            user code, or by ``owner`` itself (remove it first: one override per module, so two
            instances of one owner, e.g. two ``LayerGraphs``, cannot silently take turns).
    """
    current = forward_owner(module)
    if current is not None:
        raise ForwardConflictError(
            f"{owner} cannot replace the forward of this {type(module).__name__}: {current} already has; "
            f"undo that first (e.g. unfuse_mlps, LayerGraphs.remove) or leave this module out"
        )
    module.__dict__["forward"] = forward
    module.__dict__[_TAG] = (owner, forward)


def remove_forward(module: nn.Module, owner: str) -> bool:
    """Give ``module`` its class's forward back, if ``owner`` replaced it.

    Args:
        module: The module.
        owner: The caller's owner tag.

    Returns:
        True if ``owner``'s override was removed; False (nothing changed) when the
        module has no override, another owner's, or one set by user code.
    """
    if owner == USER or forward_owner(module) != owner:
        return False
    del module.__dict__["forward"]
    del module.__dict__[_TAG]
    return True
