"""Linears over a few rows on the CPU (decoding steps): ``(W·xᵀ)ᵀ`` where MKL's few-row sgemm is slow.

A decoding step multiplies each weight by a handful of rows (one per sequence of the
batch). On the CPU, ``F.linear(x, W)`` (MKL's ``x·Wᵀ`` sgemm) is poor at that shape,
worst for the output head's very wide ``W``; the same product taken the other way
round, ``(W·xᵀ)ᵀ``, lets MKL stream ``W`` once. Probe (SmolLM2-135M's shapes; 2 EPYC
cores, torch 2.13, fp32; weights cycled through > L3 so every call reads them cold,
variants interleaved, medians of 7-9 blocks; speed-up of ``(W·xᵀ)ᵀ`` over ``F.linear``)::

    rows:                1         2         4         8         16        32        64
    576 -> 49152 (head)  1.0x      5-6x      2.5-3x    1.4-1.5x  1.3-1.5x  1.3x      1.2x
    576 -> 576 (q, o)    1.0x      2.2x      1.6x      0.7x      1.4x      1.4x
    576 -> 192 (k, v)    1.0x      2.0x      1.6x      1.1x      1.4x      1.1x
    576 -> 1536 (gate)   0.9x      4.3x      2.4x      0.9x      1.2x      1.1x
    1536 -> 576 (down)   1.1x      1.8x      1.1x      0.65x     1.0x      1.1x

Hence the rule (:func:`takes_route`): fp32 on the CPU, no autograd graph being
recorded, no autocast, and 2-4 rows for any Linear or 2-32 rows for a wide one
(``out_features >= 16 · in_features``: output heads); everything else is the stock
``F.linear``. The two forms are the same sum in another order (fp32 rounding only;
the tests hold both to the textbook dot-product bound against float64); the output
is returned contiguous, as ``F.linear``'s. Training never takes the route (its inputs
require grad).

Applied to the output head by :func:`route_head` (a :mod:`lorakit.routing` override owned by
``lorakit.few_rows``), which :func:`lorakit.for_inference`, :func:`lorakit.adapter_batch` and
``lorakit.generate`` / ``generate_batch`` (:func:`head_routed`, for the call) install and
:func:`lorakit.for_training`, ``unload`` and the end of the block undo (:func:`unroute_head`);
the base matmul of ``adapter_batch``'s decoding steps calls :func:`linear`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import routing

__all__ = ["OWNER", "takes_route", "linear", "route_head", "unroute_head", "head_routed"]

OWNER = "lorakit.few_rows"
MIN_ROWS = 2  # one row: both forms are MKL's gemv, equally fast
MAX_ROWS = 4  # any Linear (8 rows: 0.65-1.1x on the decoder's shapes)
MAX_ROWS_WIDE = 32  # wide Linears (1.3x at 32 rows, 1.2x at 64 within the noise)
WIDE = 16  # out_features >= WIDE * in_features counts as wide
BLOCK = 64  # the (out, rows) -> (rows, out) copy runs in blocks of this many outputs ...
BLOCKED_MIN = 1024  # ... for outputs this wide or wider (a head: the copy is ~3% of its ~8-13 ms call)


def takes_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`linear` computes ``(W·xᵀ)ᵀ`` for this call instead of ``F.linear``.

    Args:
        x: The input, ``(..., in_features)``.
        weight: The weight, ``(out_features, in_features)``.
        bias: The bias or None.

    Returns:
        True for fp32 CPU tensors (contiguous weight) outside autocast with no autograd graph
        recorded, and 2..MAX_ROWS rows (2..MAX_ROWS_WIDE for a wide weight).
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if weight.dim() != 2 or x.dim() < 2 or x.shape[-1] != weight.shape[1] or not weight.is_contiguous():
        return False
    if bias is not None and bias.dtype != torch.float32:
        return False
    grads = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if grads and torch.is_grad_enabled():
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    return MIN_ROWS <= rows <= (MAX_ROWS_WIDE if out_features >= WIDE * in_features else MAX_ROWS)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, taken as ``(W·xᵀ)ᵀ`` where :func:`takes_route` says so.

    Args:
        x: The input, ``(..., in_features)``.
        weight: The weight, ``(out_features, in_features)``.
        bias: The bias or None.

    Returns:
        ``(..., out_features)``, contiguous; equal to ``F.linear``'s up to fp32 summation order.
    """
    if not takes_route(x, weight, bias):
        return F.linear(x, weight, bias)
    out_features, in_features = weight.shape
    yt = torch.mm(weight, x.reshape(-1, in_features).T)  # (out, rows)
    rows = yt.shape[1]
    if out_features >= BLOCKED_MIN and out_features % BLOCK == 0:
        # the transposing copy in blocks of BLOCK outputs: 8 x 49152 in 0.21 ms, .T.contiguous() 0.43 ms
        y = yt.new_empty(rows, out_features)
        y.view(rows, -1, BLOCK).transpose(0, 1).copy_(yt.view(-1, BLOCK, rows).transpose(1, 2))
    else:
        y = yt.T.contiguous()  # (rows, out)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], out_features)


def _forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, module.weight, module.bias)


def _head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if type(head) is nn.Linear else None  # a LoRA-wrapped or quantized head keeps its own forward


def route_head(model: nn.Module) -> bool:
    """Route the model's output head (a plain ``nn.Linear``) through :func:`linear`.

    Args:
        model: A transformers model (``get_output_embeddings``); other models are left alone.

    Returns:
        True if this call installed the route; False when there is no plain Linear head, its
        weight is not fp32 on the CPU, or its forward is already replaced (by this module or another owner).
    """
    head = _head(model)
    if head is None or head.weight.device.type != "cpu" or head.weight.dtype != torch.float32:
        return False
    if routing.forward_owner(head) is not None:
        return False
    routing.set_forward(head, functools.partial(_forward, head), OWNER)
    return True


def unroute_head(model: nn.Module) -> bool:
    """Undo :func:`route_head`: the head runs ``nn.Linear.forward`` again.

    Args:
        model: The model.

    Returns:
        True if a route was removed.
    """
    head = _head(model)
    return head is not None and routing.remove_forward(head, OWNER)


@contextlib.contextmanager
def head_routed(model: nn.Module) -> Iterator[bool]:
    """Context manager: :func:`route_head` for the ``with`` block, undone on exit if it was installed here.

    Args:
        model: The model.

    Yields:
        Whether the block installed the route (False: not applicable, or already routed).
    """
    routed = route_head(model)
    try:
        yield routed
    finally:
        if routed:
            unroute_head(model)
