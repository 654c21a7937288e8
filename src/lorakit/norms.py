"""Training-time routing: RMSNorm layers that save their output for backward, not their input.

An RMSNorm ``y = w ⊙ x · rstd`` (``rstd = 1 / sqrt(mean(x²) + eps)``) under stock
autograd saves its input ``x``: the residual stream, one ``[tokens, hidden]`` tensor
per norm that nothing else keeps. The layer after it (q/k/v, gate/up with LoRA)
saves the norm's output ``y`` anyway, for its ``grad A``. With a frozen weight the
input's gradient needs only ``y`` and ``rstd``::

    x̂ = y / w,   m = mean(y ⊙ dy),   dx = rstd · (w ⊙ dy − x̂ · m)

so :func:`route_rms_norms` routes each RMSNorm through :class:`_RmsNormFn`, which
saves ``y`` (the very tensor it returns, so the next layer's saved copy is the same
storage) and ``rstd``: two ``[tokens, hidden]`` tensors fewer per decoder layer
(benchmarks/RESULTS.md, "Norms and attention that keep nothing twice": a short int8
step of the default model saves 445 MiB for backward instead of 520, and its peak RSS
fell from 1.69 to 1.52 GiB). The forward runs the same ops in the same order as transformers'
Llama-family norm, so its output is bitwise the module's own.

Which modules: any with a 1-D ``weight`` and an ``eps`` (``variance_epsilon`` or
``eps``) whose own forward, run once on a probe when routing, gives the formula
above (Llama, Mistral, Qwen, Phi-3, T5 norms; not Gemma's ``1 + w``, not LayerNorm).
A weight with a zero (or a magnitude below :data:`MIN_WEIGHT`) is left alone, since
``x̂`` cannot be recovered through it; the check runs again whenever the weight
changes (its version counter). At call time the route steps aside for anything but
a float32 input with autograd on and a frozen float32 weight (a bf16 base, a
trained norm, inference), where the module's own forward runs. A model that wrote into a
norm's output in place would meet autograd's version check (an error, never a wrong
gradient); the Llama-family models do not. Undo with :func:`unroute_rms_norms`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from . import routing

__all__ = ["MIN_WEIGHT", "route_rms_norms", "unroute_rms_norms"]

_ROUTE_OWNER = __name__  # lorakit.routing owner tag
# Below this |w| the division y / w would lose x̂ to underflow (y is then denormal); such a norm keeps its own path.
MIN_WEIGHT = 1e-30


def _norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(y, rstd)``: transformers' Llama-family ops in its order, so ``y`` is bitwise the module's output."""
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x * rstd), rstd


class _RmsNormFn(torch.autograd.Function):
    """``w ⊙ x · rsqrt(mean(x²) + eps)`` over the last dim, saving ``(y, rstd)``; ``w`` frozen, no zeros."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        y, rstd = _norm(x, weight, eps)
        ctx.save_for_backward(y, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        y, rstd, weight = ctx.saved_tensors
        m = (y * dy).mean(-1, keepdim=True)  # mean(x̂ ⊙ w ⊙ dy)
        dx = y / weight  # x̂
        dx.mul_(m.neg_()).addcmul_(dy, weight).mul_(rstd)  # rstd · (w ⊙ dy − x̂ · m)
        return dx, None, None


def _eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        eps = getattr(module, name, None)
        if isinstance(eps, float):
            return eps
    if isinstance(module, nn.RMSNorm) and module.eps is None:  # torch's default: the dtype's epsilon
        return torch.finfo(torch.float32).eps
    return None


def _weight_ok(weight: Tensor) -> bool:
    """No zero (or underflowing) entry, nothing infinite or NaN: ``x̂ = y / w`` is exact to rounding."""
    a = weight.detach().abs()
    return bool(((a >= MIN_WEIGHT) & torch.isfinite(a)).all())


def _is_rms_norm(module: nn.Module) -> bool:
    """Whether ``module`` is an RMSNorm this route reproduces: checked on a probe against its own forward."""
    weight = getattr(module, "weight", None)
    eps = _eps(module)
    if not isinstance(weight, Tensor) or weight.dim() != 1 or weight.dtype != torch.float32 or weight.is_meta:
        return False
    if eps is None or any(True for _ in module.children()):
        return False
    gen = torch.Generator().manual_seed(0)
    probe = (torch.randn(3, weight.numel(), generator=gen) * 3).to(weight.device)
    with torch.no_grad():
        try:
            own = type(module).forward(module, probe)
        except Exception:  # noqa: BLE001 - a forward that wants other arguments is not a plain norm
            return False
        mine = _norm(probe, weight, eps)[0]
    return isinstance(own, Tensor) and own.shape == mine.shape and torch.allclose(own, mine, rtol=1e-5, atol=1e-6)


def _routed_forward(module: nn.Module, x: Tensor) -> Tensor:
    """The output-saving norm where it applies (fp32, autograd on, frozen usable weight), else the module's own."""
    weight = module.weight
    if torch.is_grad_enabled() and x.dtype == torch.float32 and weight.dtype == torch.float32:
        if not weight.requires_grad:
            version = weight._version
            if module.__dict__.get("_lorakit_norm_checked") != version:  # first call, or the weight was written
                module.__dict__["_lorakit_norm_ok"] = _weight_ok(weight)
                module.__dict__["_lorakit_norm_checked"] = version
            if module.__dict__["_lorakit_norm_ok"]:
                return _RmsNormFn.apply(x, weight, _eps(module))
    return type(module).forward(module, x)


def route_rms_norms(model: nn.Module) -> int:
    """Route ``model``'s RMSNorm layers through the output-saving norm (see the module docstring).

    Modules another owner already routes are left alone, as are those this route
    already has (not counted again) and those whose weight has a zero.

    Args:
        model: Any model (typically an injected one, before training).

    Returns:
        The number of norms newly routed.
    """
    count = 0
    for module in model.modules():
        if routing.forward_owner(module) is None and _is_rms_norm(module) and _weight_ok(module.weight):
            # a partial of a module-level function pickles (torch.save of the model)
            routing.set_forward(module, functools.partial(_routed_forward, module), _ROUTE_OWNER)
            # checked here, so a first call inside a CUDA-graph capture needs no host sync
            module.__dict__["_lorakit_norm_ok"] = True
            module.__dict__["_lorakit_norm_checked"] = module.weight._version
            count += 1
    return count


def unroute_rms_norms(model: nn.Module) -> None:
    """Give every norm routed by :func:`route_rms_norms` its own forward back."""
    for module in model.modules():
        if routing.remove_forward(module, _ROUTE_OWNER):
            module.__dict__.pop("_lorakit_norm_checked", None)
            module.__dict__.pop("_lorakit_norm_ok", None)
