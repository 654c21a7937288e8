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
and get their gradients back in fp32.

The fused SwiGLU MLP, built on the shared-input helpers here, lives in
:mod:`lorakit.swiglu`.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, NamedTuple, Sequence

import torch
from torch import Tensor

from lorakit.errors import ConfigError, ModelMismatchError

__all__ = ["LoraSpec", "lora_linear", "lora_linear_multi", "recompute_mode", "in_recompute"]


class LoraSpec(NamedTuple):
    """One adapted Linear: frozen base plus LoRA factors.

    Attributes:
        weight: Base weight ``[out, in]`` (usually frozen; fp32 or bf16).
        bias: Base bias ``[out]`` or None.
        lora_A: Down-projection ``[r, in]`` (fp32, trainable).
        lora_B: Up-projection ``[out, r]`` (fp32, trainable).
        scaling: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` for rsLoRA).
    """

    weight: Tensor
    bias: Tensor | None
    lora_A: Tensor
    lora_B: Tensor
    scaling: float


# --------------------------------------------------------------------------- helpers


def _compute_dtype(x: Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the matmuls run in: explicit, else the active autocast dtype, else x's."""
    if compute_dtype is not None:
        return compute_dtype
    dev = x.device.type
    if x.is_floating_point() and torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Switch autocast off inside our functions: every cast in them is explicit."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _RecomputeState(threading.local):
    active = False


_RECOMPUTE = _RecomputeState()


@contextlib.contextmanager
def recompute_mode() -> Iterator[None]:
    """Mark a gradient-checkpointing recompute (the forward rerun during backward).

    Modules whose output only feeds a residual add (marked by
    :func:`lorakit.train.recompute.enable_checkpointing`) ask
    :func:`in_recompute` and pass ``compute_output=False``: the rerun then saves
    what LoRA's backward needs without the frozen output matmul nobody reads.
    """
    prev, _RECOMPUTE.active = _RECOMPUTE.active, True
    try:
        yield
    finally:
        _RECOMPUTE.active = prev


def in_recompute() -> bool:
    """True inside :func:`recompute_mode` (on this thread)."""
    return _RECOMPUTE.active


def _draw_seed() -> int:
    """A dropout seed taken from torch's global RNG (so ``torch.manual_seed`` governs it)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def _keep_mask(shape: torch.Size, p: float, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The 0/1 keep-mask of dropout ``p`` drawn from a private generator seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=gen)


def _mask_for(x2: Tensor, explicit: Tensor | None, seed: int | None, p: float) -> Tensor | None:
    """The dropout multiplier for the flattened input ``x2 [N, in]`` (None without dropout)."""
    if explicit is not None:
        return explicit.reshape(x2.shape).to(x2.dtype)
    if seed is None:
        return None
    return _keep_mask(x2.shape, p, seed, x2.device, x2.dtype)


def _drop(t: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """``t ⊙ mask · scale`` (``scale`` is 1/(1-p) for a drawn 0/1 mask, 1 for an explicit one)."""
    if mask is None:
        return t
    out = t * mask
    return out.mul_(scale) if scale != 1.0 else out


# --------------------------------------------------------- k adapted Linears sharing x


def _branches_forward(x2, mask, scale, params, scalings, cd, compute_output=True):
    """Forward of k adapted Linears reading the same ``x2 [N, in]``.

    Returns the k outputs ``[N, out_i]`` and the concatenated ``xa [N, R]``,
    ``R = Σ r_i``, from one down-projection matmul. With ``compute_output``
    False only ``xa`` is computed and the outputs are left uninitialised.
    """
    As = params[2::4]
    A = torch.cat([a.to(cd) for a in As]) if len(As) > 1 else As[0].to(cd)  # [R, in]
    xa = _drop(x2, mask, scale) @ A.t()  # [N, R]
    if not compute_output:  # a recompute whose outputs nothing reads: backward needs x and xa only
        return [x2.new_empty((x2.shape[0], W.shape[0])) for W in params[0::4]], xa
    outs, off = [], 0
    for (W, b, _, B), s in zip(zip(*[iter(params)] * 4), scalings):
        Wt = W.to(cd).t()  # [in, out]
        y = x2 @ Wt if b is None else torch.addmm(b.to(cd), x2, Wt)  # [N, out]
        r = B.shape[1]
        y.addmm_(xa[:, off : off + r], B.to(cd).t(), alpha=s)  # += s·(xA_iᵀ)B_iᵀ, in place
        off += r
        outs.append(y)
    return outs, xa


def _branches_backward(x2, xa, mask, scale, params, scalings, cd, dys, needs, need_x):
    """Backward of :func:`_branches_forward`.

    Args are the forward's plus ``dys`` (k grads ``[N, out_i]``), ``needs`` (4k
    flags for W, b, A, B of each branch) and ``need_x``. Returns ``(grad_x2 or
    None, [4k grads or None])``; grads of params come back in their own dtype.
    """
    grads: list[Tensor | None] = []
    gs, gx, off = [], None, 0
    for i, ((W, b, A, B), s, dy) in enumerate(zip(zip(*[iter(params)] * 4), scalings, dys)):
        dy = dy.to(cd)  # [N, out]
        r = B.shape[1]
        gs.append((dy @ B.to(cd)).mul_(s))  # s·dY B: [N, r], small side first
        nW, nb, _, nB = needs[4 * i : 4 * i + 4]
        gW = (dy.t() @ x2).to(W.dtype) if nW else None  # [out, in], only if W trains
        gb = dy.sum(0, dtype=torch.float32).to(b.dtype) if nb else None  # [out]
        gB = (dy.t() @ xa[:, off : off + r]).mul_(s).to(B.dtype) if nB else None  # [out, r]
        grads += [gW, gb, None, gB]
        if need_x:  # Σ_i dY_i W_i accumulated in one buffer: [N, in]
            gx = dy @ W.to(cd) if gx is None else gx.addmm_(dy, W.to(cd))
        off += r
    g = torch.cat(gs, 1) if len(gs) > 1 else gs[0]  # [N, R]
    As = params[2::4]
    A = torch.cat([a.to(cd) for a in As]) if len(As) > 1 else As[0].to(cd)  # [R, in]
    if any(needs[2::4]):
        gA = g.t() @ _drop(x2, mask, scale)  # [R, in], one matmul for all branches
        for i, part in enumerate(gA.split([a.shape[0] for a in As])):
            grads[4 * i + 2] = part.to(As[i].dtype) if needs[4 * i + 2] else None
    if need_x:
        if mask is None:
            gx.addmm_(g, A)  # += s·(dY B) A: [N, r]·[r, in]
        else:
            gx.add_(_drop(g @ A, mask, scale))  # dropout's mask gates the LoRA branch only
    return gx, grads


class _LoraLinearFn(torch.autograd.Function):
    """k adapted Linears over one input; see :func:`lora_linear_multi`."""

    @staticmethod
    def forward(ctx, x, dropout_mask, seed, p, scalings, cd, compute_output, *params):
        with _no_autocast(x.device.type):
            ctx.seed, ctx.p, ctx.scalings, ctx.cd, ctx.x_dtype = seed, p, scalings, cd, x.dtype
            ctx.scale = 1.0 if seed is None else 1.0 / (1.0 - p)
            xc = x.to(cd)  # [..., in]
            x2 = xc.reshape(-1, x.shape[-1])  # [N, in]
            mask = _mask_for(x2, dropout_mask, ctx.seed, ctx.p)
            outs, xa = _branches_forward(x2, mask, ctx.scale, params, scalings, cd, compute_output)
            ctx.save_for_backward(xc, xa, dropout_mask, *params)
            lead = x.shape[:-1]
            return tuple(y.view(*lead, y.shape[-1]) for y in outs)

    @staticmethod
    def backward(ctx, *dys):
        xc, xa, dropout_mask, *params = ctx.saved_tensors
        with _no_autocast(xc.device.type):
            x2 = xc.reshape(-1, xc.shape[-1])  # [N, in]
            mask = _mask_for(x2, dropout_mask, ctx.seed, ctx.p)
            dys2 = [dy.reshape(-1, dy.shape[-1]) for dy in dys]  # [N, out_i]
            need_x = ctx.needs_input_grad[0]
            gx, grads = _branches_backward(
                x2, xa, mask, ctx.scale, params, ctx.scalings, ctx.cd, dys2, ctx.needs_input_grad[7:], need_x
            )
            if gx is not None:
                gx = gx.view(xc.shape).to(ctx.x_dtype)
        return (gx, None, None, None, None, None, None, *grads)


def _prepare(x, specs, dropout_p, training, dropout_mask, compute_dtype):
    """Validate arguments and flatten specs into Function.apply's positional inputs."""
    if not 0.0 <= dropout_p < 1.0:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {dropout_p}")
    if not specs:
        raise ValueError("lora_linear_multi needs at least one LoraSpec, got none")
    for spec in specs:
        W, A, B = spec.weight, spec.lora_A, spec.lora_B
        if W.shape[1] != x.shape[-1] or A.shape[1] != x.shape[-1] or B.shape != (W.shape[0], A.shape[0]):
            raise ModelMismatchError(
                f"LoRA shapes do not fit: x [..., {x.shape[-1]}], weight {tuple(W.shape)}, "
                f"lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}; expected weight [out, in], "
                f"lora_A [r, in], lora_B [out, r]"
            )
    if dropout_mask is not None and dropout_mask.shape != x.shape:
        raise ValueError(f"dropout_mask must have x's shape {tuple(x.shape)}, got {tuple(dropout_mask.shape)}")
    use_drop = training and dropout_p > 0.0
    mask = dropout_mask if use_drop else None
    seed = _draw_seed() if use_drop and mask is None else None
    params = [t for spec in specs for t in (spec.weight, spec.bias, spec.lora_A, spec.lora_B)]
    scalings = tuple(float(spec.scaling) for spec in specs)
    return mask, seed, scalings, _compute_dtype(x, compute_dtype), params


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
        specs: One :class:`LoraSpec` per branch, all with ``in`` features.
        dropout_p: Dropout on the LoRA branch's input, in ``[0, 1)``.
        training: Dropout is applied only when True.
        dropout_mask: Optional explicit multiplier of x's shape (values 0 or
            ``1/(1-p)``); used instead of a drawn mask when training and p > 0.
        compute_dtype: Matmul dtype; None means the autocast dtype when autocast
            is on for x's device, else ``x.dtype``.
        compute_output: False skips the output matmuls and returns uninitialised
            tensors of the output's shape while saving everything backward needs:
            for a gradient-checkpointing recompute whose output nothing reads.

    Returns:
        One tensor ``[..., out_i]`` per spec, in the compute dtype.

    Raises:
        ConfigError: ``dropout_p`` outside ``[0, 1)``.
        ModelMismatchError: a weight or LoRA factor does not fit ``x``.
    """
    mask, seed, scalings, cd, params = _prepare(x, specs, dropout_p, training, dropout_mask, compute_dtype)
    return _LoraLinearFn.apply(x, mask, seed, dropout_p, scalings, cd, compute_output, *params)


def lora_linear(
    x: Tensor,
    weight: Tensor,
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
        weight: Base weight ``[out, in]``, fp32 or bf16.
        bias: Base bias ``[out]`` or None; gets a gradient if it requires one.
        lora_A: ``[r, in]``, fp32 master.
        lora_B: ``[out, r]``, fp32 master.
        scaling: ``s`` (``alpha/r``, or ``alpha/sqrt(r)`` for rsLoRA).
        dropout_p: Dropout on the LoRA branch's input, in ``[0, 1)``.
        training: Dropout is applied only when True.
        dropout_mask: Optional explicit multiplier of x's shape (values 0 or
            ``1/(1-p)``), used instead of a drawn mask (tests).
        compute_dtype: Matmul dtype; None means the autocast dtype when autocast
            is on for x's device, else ``x.dtype``.
        compute_output: False skips the output matmuls and returns uninitialised
            tensors of the output's shape while saving everything backward needs:
            for a gradient-checkpointing recompute whose output nothing reads.

    Returns:
        ``[..., out]`` in the compute dtype.

    Raises:
        ConfigError: ``dropout_p`` outside ``[0, 1)``.
        ModelMismatchError: the weight or LoRA factors do not fit ``x``.
    """
    spec = LoraSpec(weight, bias, lora_A, lora_B, scaling)
    return lora_linear_multi(x, [spec], dropout_p, training, dropout_mask, compute_dtype, compute_output)[0]
