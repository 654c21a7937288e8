"""The Llama MLP ``down(silu(gate(x)) * up(x))`` with LoRA on all three, as one fused autograd function.

:func:`lora_swiglu_mlp` runs gate and up as one shared-input branch pair and
down as a third, and recomputes the activation in backward instead of saving
it. It wraps the math of :mod:`lorakit.branches` (k adapted Linears over one
input, dropout masks redrawn from seeds, argument checks) in one autograd
function, with autocast off inside (:func:`lorakit.precision.no_autocast`); the
memory rules of :mod:`lorakit.ops` hold here too, and so does its weight slot: the
three bases may be quantized (4-bit, int8), each dequantized per matmul, never saved.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .branches import (
    LoraSpec,
    branches_backward,
    branches_forward,
    draw_seed,
    dropout_multiplier,
    prepare,
    restore,
    saveable,
)
from .errors import ConfigError
from .precision import no_autocast

__all__ = ["lora_swiglu_mlp"]


class _SwigluFn(torch.autograd.Function):
    """``down(silu(gate(x)) * up(x))`` with LoRA on all three; see :func:`lora_swiglu_mlp`."""

    @staticmethod
    def forward(ctx, x, seeds, p, scalings, cd, out_dtype, compute_output, *params):
        with no_autocast(x.device.type):
            ctx.seeds, ctx.p, ctx.scalings, ctx.cd, ctx.x_dtype = seeds, p, scalings, cd, x.dtype
            ctx.scale = 1.0 if seeds is None else 1.0 / (1.0 - p)
            xc = x.to(cd)
            x2 = xc.reshape(-1, x.shape[-1])  # [N, H]
            sx, sh = seeds if seeds is not None else (None, None)
            mask = dropout_multiplier(x2, None, sx, p)
            # [N, I] x2; over quantized bases summed in x's dtype (fp32 under bf16 compute), as PEFT does
            (g, u), xa = branches_forward(x2, mask, ctx.scale, params[:8], scalings[:2], cd, out_dtype=out_dtype)
            h = torch.nn.functional.silu(g).mul_(u).to(cd)  # [N, I], freed after this call
            mask_h = dropout_multiplier(h, None, sh, p)
            (y,), ha = branches_forward(h, mask_h, ctx.scale, params[8:], scalings[2:], cd, compute_output, out_dtype)
            saved, ctx.bases = saveable(params)  # a quantized base is kept on ctx, never a weight
            ctx.save_for_backward(xc, xa, g.to(cd), u.to(cd), ha, *saved)  # saved in cd: backward computes there
            return y.view(*x.shape[:-1], y.shape[-1]).to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        xc, xa, g, u, ha, *saved = ctx.saved_tensors
        params = restore(saved, ctx.bases)
        sx, sh = ctx.seeds if ctx.seeds is not None else (None, None)
        needs = ctx.needs_input_grad[7:]
        with no_autocast(xc.device.type):
            x2 = xc.reshape(-1, xc.shape[-1])  # [N, H]
            sg = torch.nn.functional.silu(g)  # recomputed, [N, I]
            h = sg * u  # [N, I]
            dy2 = dy.reshape(-1, dy.shape[-1])
            mask_h = dropout_multiplier(h, None, sh, ctx.p)
            gh, grads_d = branches_backward(
                h, ha, mask_h, ctx.scale, params[8:], ctx.scalings[2:], ctx.cd, [dy2], needs[8:], True
            )
            del h, mask_h
            gu = gh * sg  # [N, I]
            # gh·u·silu'(g), silu'(g) = σ(g)(1 + g(1 − σ(g))): torch's fused silu_backward kernel, one pass
            # instead of six elementwise ones, written into gh's buffer.
            gg = torch.ops.aten.silu_backward.grad_input(gh.mul_(u), g, grad_input=gh)  # [N, I]
            mask = dropout_multiplier(x2, None, sx, ctx.p)
            gx, grads_gu = branches_backward(
                x2,
                xa,
                mask,
                ctx.scale,
                params[:8],
                ctx.scalings[:2],
                ctx.cd,
                [gg, gu],
                needs[:8],
                ctx.needs_input_grad[0],
            )
            if gx is not None:
                gx = gx.view(xc.shape).to(ctx.x_dtype)
        return (gx, None, None, None, None, None, None, *grads_gu, *grads_d)


def lora_swiglu_mlp(
    x: Tensor,
    gate_spec: LoraSpec,
    up_spec: LoraSpec,
    down_spec: LoraSpec,
    act: str = "silu",
    dropout_p: float = 0.0,
    training: bool = True,
    compute_dtype: torch.dtype | None = None,
    compute_output: bool = True,
) -> Tensor:
    """The Llama MLP ``down(silu(gate(x)) * up(x))`` with LoRA on all three, fused.

    gate and up share one down-projection of ``x`` (as in
    :func:`lora_linear_multi`). Backward recomputes ``silu(g)`` and
    ``h = silu(g)·u`` from the saved ``g`` and ``u``: stock autograd keeps four
    ``[N, I]`` tensors (``g``, ``silu(g)``, ``u``, ``h``) plus any dropped copies
    and masks, this keeps two (``g``, ``u``), plus ``x`` and the r-wide
    projections. With dropout, gate/up share one mask on ``x`` and down draws
    its own on ``h``; both are redrawn from seeds in backward.

    Args:
        x: Input ``[..., H]``.
        gate_spec: gate_proj, weight ``[I, H]`` (a tensor or a quantized base, as every spec here).
        up_spec: up_proj, weight ``[I, H]``.
        down_spec: down_proj, weight ``[H, I]``.
        act: Activation; only ``"silu"`` (Llama, Mistral, Qwen) is supported.
        dropout_p: LoRA dropout, in ``[0, 1)``.
        training: Dropout is applied only when True.
        compute_dtype: Matmul dtype; None means a quantized base's own compute dtype, else
            autocast's dtype if on, else ``x.dtype``.
        compute_output: False skips the output matmuls and returns uninitialised
            a tensor of the output's shape while saving everything backward needs:
            for a gradient-checkpointing recompute whose output nothing reads.

    Returns:
        ``[..., H]`` in the compute dtype (on quantized bases: in ``x.dtype``, at least fp32
        under autocast; gate/up/down each summed with its LoRA term there, ``silu(g)·u``
        then cast to the compute dtype for down's matmuls).

    Raises:
        ConfigError: an unsupported ``act`` or ``dropout_p``.
        ModelMismatchError: a weight or LoRA factor does not fit.
    """
    if act != "silu":
        raise ConfigError(f"lora_swiglu_mlp supports act='silu' only, got {act!r}; use lora_linear per layer")
    _, _, sc_gu, cd, out_dtype, p_gu = prepare(x, [gate_spec, up_spec], dropout_p, False, None, compute_dtype)
    h_like = x.new_empty((1, gate_spec.weight.shape[0]))  # only its width is checked
    _, _, sc_d, _, _, p_d = prepare(h_like, [down_spec], dropout_p, False, None, compute_dtype)
    seeds = (draw_seed(), draw_seed()) if training and dropout_p > 0 else None
    return _SwigluFn.apply(x, seeds, dropout_p, sc_gu + sc_d, cd, out_dtype, compute_output, *p_gu, *p_d)
