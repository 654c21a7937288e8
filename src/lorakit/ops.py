"""The LoRA math as fused autograd functions.

One adapted Linear computes ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ`` with a frozen
base weight ``W [out, in]``, an optional bias ``b [out]`` and trainable
``A [r, in]``, ``B [out, r]``. Stock autograd over that formula keeps more than
backward needs (a dropped copy of ``x``, the dropout mask, a second cast of
``x`` under autocast); the functions here keep only:

* ``x`` once, in the compute dtype,
* the r-wide down-projection ``drop(x) Aᵀ`` ``[N, r]``,
* for dropout, one integer seed: the keep-mask is redrawn in backward from a
  private generator. A saved bool mask would cost ``N·in`` bytes per layer (a
  third of a bf16 ``x``); redrawing it costs one ``bernoulli_`` over ``N·in``,
  which is O(N·in) work next to the O(N·in·out) matmuls, so memory wins.

Every product that touches the rank is done "small side first": ``dY·B`` is
``[N, r]`` before it meets ``A`` or ``x``. Base weights may be stored in bf16;
``A``/``B`` stay fp32 masters, are cast to the compute dtype for the matmuls
and get their gradients back in fp32. A base may also be quantized (4-bit or
int8, a :class:`lorakit.branches.QuantizedBase` in the weight slot): its weight
is then dequantized per matmul (or multiplied by an integer kernel) and never
saved, so the same functions, and the fusions built on them, serve QLoRA.

The math of k adapted Linears over one input (forward, backward, dropout
seeds, argument checks) lives in :mod:`lorakit.branches`; this module wraps it
as one autograd function. The fused SwiGLU MLP, built on the same math, lives
in :mod:`lorakit.swiglu`. ``LoraSpec`` is re-exported from
:mod:`lorakit.branches`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .branches import (
    LoraSpec,
    QuantizedBase,
    branches_backward,
    branches_forward,
    dropout_multiplier,
    prepare,
    restore,
    saveable,
)
from .precision import no_autocast

__all__ = ["LoraSpec", "lora_linear", "lora_linear_multi"]


class _LoraLinearFn(torch.autograd.Function):
    """k adapted Linears over one input; see :func:`lora_linear_multi`."""

    @staticmethod
    def forward(ctx, x, dropout_mask, seed, p, scalings, cd, out_dtype, compute_output, *params):
        with no_autocast(x.device.type):
            ctx.seed, ctx.p, ctx.scalings, ctx.cd, ctx.x_dtype = seed, p, scalings, cd, x.dtype
            ctx.scale = 1.0 if seed is None else 1.0 / (1.0 - p)
            xc = x.to(cd)  # [..., in]
            x2 = xc.reshape(-1, x.shape[-1])  # [N, in]
            mask = dropout_multiplier(x2, dropout_mask, ctx.seed, ctx.p)
            outs, xa = branches_forward(x2, mask, ctx.scale, params, scalings, cd, compute_output, out_dtype)
            saved, ctx.bases = saveable(params)  # a quantized base is kept on ctx, never a weight
            ctx.save_for_backward(xc, xa, dropout_mask, *saved)
            lead = x.shape[:-1]
            return tuple(y.view(*lead, y.shape[-1]).to(out_dtype) for y in outs)

    @staticmethod
    def backward(ctx, *dys):
        xc, xa, dropout_mask, *saved = ctx.saved_tensors
        params = restore(saved, ctx.bases)
        with no_autocast(xc.device.type):
            x2 = xc.reshape(-1, xc.shape[-1])  # [N, in]
            mask = dropout_multiplier(x2, dropout_mask, ctx.seed, ctx.p)
            dys2 = [dy.reshape(-1, dy.shape[-1]) for dy in dys]  # [N, out_i]
            need_x = ctx.needs_input_grad[0]
            gx, grads = branches_backward(
                x2, xa, mask, ctx.scale, params, ctx.scalings, ctx.cd, dys2, ctx.needs_input_grad[8:], need_x
            )
            if gx is not None:
                gx = gx.view(xc.shape).to(ctx.x_dtype)
        return (gx, None, None, None, None, None, None, None, *grads)


# ----------------------------------------------------------------------------- public


def lora_linear_multi(
    x: Tensor,
    specs: Sequence[LoraSpec],
    dropout_p: float = 0.0,
    training: bool = True,
    dropout_mask: Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    compute_output: bool = True,
) -> tuple[Tensor, ...]:
    """Several adapted Linears that read the same input (q/k/v, gate/up), fused.

    One concatenated down-projection ``drop(x)·[A_1; …; A_k]ᵀ`` serves every
    branch (ranks may differ), ``x`` is saved once for all of them, and
    backward accumulates ``grad_x`` from every branch into one buffer. All
    branches share one dropout mask and ``p``; callers whose modules use
    different dropout fall back to separate :func:`lora_linear` calls.

    Args:
        x: Input ``[..., in]`` (2-D or 3-D, may be non-contiguous).
        specs: One :class:`LoraSpec` per branch, all with ``in`` features; a spec's weight
            may be a quantized base.
        dropout_p: Dropout on the LoRA branch's input, in ``[0, 1)``.
        training: Dropout is applied only when True.
        dropout_mask: Optional explicit multiplier of x's shape (values 0 or
            ``1/(1-p)``); used instead of a drawn mask when training and p > 0.
        compute_dtype: Matmul dtype; None means a quantized base's own compute dtype,
            else the autocast dtype when autocast is on for x's device, else ``x.dtype``.
        compute_output: False skips the output matmuls and returns uninitialised
            tensors of the output's shape while saving everything backward needs:
            for a gradient-checkpointing recompute whose output nothing reads.

    Returns:
        One tensor ``[..., out_i]`` per spec, in the compute dtype (on quantized bases: in
        ``x.dtype``, at least fp32 under autocast, base + LoRA summed there; see
        :func:`lorakit.branches.prepare`).

    Raises:
        ConfigError: ``dropout_p`` outside ``[0, 1)``.
        ModelMismatchError: a weight or LoRA factor does not fit ``x``.
    """
    mask, seed, scalings, cd, out_dtype, params = prepare(x, specs, dropout_p, training, dropout_mask, compute_dtype)
    return _LoraLinearFn.apply(x, mask, seed, dropout_p, scalings, cd, out_dtype, compute_output, *params)


def lora_linear(
    x: Tensor,
    weight: Tensor | QuantizedBase,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    dropout_mask: Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    compute_output: bool = True,
) -> Tensor:
    """One adapted Linear, ``y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ``, as a fused autograd op.

    The LoRA term is added into the base output in place (no second ``[N, out]``
    buffer). Saved for backward: ``x`` once (in the compute dtype), ``drop(x)Aᵀ``
    ``[N, r]`` and, with dropout, an integer seed. No gradient is computed for a
    frozen ``weight`` or for an ``x`` that does not require grad.

    Args:
        x: Input ``[..., in]`` (2-D or 3-D, may be non-contiguous).
        weight: Base weight ``[out, in]``, fp32 or bf16, or a quantized base (never saved).
        bias: Base bias ``[out]`` or None; gets a gradient if it requires one.
        lora_A: ``[r, in]``, fp32 master.
        lora_B: ``[out, r]``, fp32 master.
        scaling: ``s`` (``alpha/r``, or ``alpha/sqrt(r)`` for rsLoRA).
        dropout_p: Dropout on the LoRA branch's input, in ``[0, 1)``.
        training: Dropout is applied only when True.
        dropout_mask: Optional explicit multiplier of x's shape (values 0 or
            ``1/(1-p)``), used instead of a drawn mask (tests).
        compute_dtype: Matmul dtype; None means a quantized base's own compute dtype,
            else the autocast dtype when autocast is on for x's device, else ``x.dtype``.
        compute_output: False skips the output matmuls and returns uninitialised
            tensors of the output's shape while saving everything backward needs:
            for a gradient-checkpointing recompute whose output nothing reads.

    Returns:
        ``[..., out]`` in the compute dtype (as :func:`lora_linear_multi`).

    Raises:
        ConfigError: ``dropout_p`` outside ``[0, 1)``.
        ModelMismatchError: the weight or LoRA factors do not fit ``x``.
    """
    spec = LoraSpec(weight, bias, lora_A, lora_B, scaling)
    return lora_linear_multi(x, [spec], dropout_p, training, dropout_mask, compute_dtype, compute_output)[0]
