"""k adapted Linears over one input: the forward and backward math that lorakit's autograd functions wrap.

:mod:`lorakit.ops` wraps it as ``lora_linear`` / ``lora_linear_multi`` (k = 1
for a single projection, q/k/v or gate/up for shared-input groups) and
:mod:`lorakit.swiglu` wraps it twice (gate/up, then down) in the fused MLP.
Nothing here is an autograd function: these are the plain tensor computations
of a forward and its hand-written backward, "small side first" (``dY·B`` is
``[N, r]`` before it meets ``A`` or ``x``).

Parameters travel as one flat list of 4k entries, ``[W_1, b_1, A_1, B_1, W_2,
...]`` (``W [out, in]``, ``b [out]`` or None, ``A [r, in]``, ``B [out, r]``),
the order ``torch.autograd.Function.apply`` receives them in.

The weight slot ``W`` holds either a weight tensor or a :class:`QuantizedBase`
(a frozen 4-bit or int8 Linear, :mod:`lorakit.quant`, :mod:`lorakit.int8`):
the math reaches a quantized weight only through ``output`` (``x Wᵀ``) and
``grad_input`` (``dY W``), which dequantize (or run an integer kernel) per call
and keep nothing, so a fused op over quantized bases never saves a weight and
holds at most one dequantized weight at a time. The autograd functions save
the tensors with :func:`saveable` and get the quantized bases back with
:func:`restore`.

Dropout is kept as one integer seed, not a mask: :func:`dropout_multiplier`
redraws the 0/1 keep-mask from a private generator seeded with it
(:func:`keep_mask`), in forward and again in backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from .errors import ConfigError, ModelMismatchError
from .precision import compute_dtype

__all__ = [
    "QuantizedBase",
    "LoraSpec",
    "draw_seed",
    "keep_mask",
    "dropout_multiplier",
    "apply_dropout",
    "sum_dtype",
    "branches_forward",
    "branches_backward",
    "prepare",
    "saveable",
    "restore",
]


@runtime_checkable
class QuantizedBase(Protocol):
    """A frozen quantized Linear (``y = x Wᵀ + b``) as the LoRA math sees it.

    :class:`lorakit.quant.Base4bit` (bitsandbytes 4-bit) and :class:`lorakit.int8.Base8bit`
    implement it; :func:`lorakit.quant.quantized_base` finds a layer's.

    Attributes:
        in_features: Input width.
        out_features: Output width.
        shape: ``(out_features, in_features)``, as a weight's.
        bias: The base bias ``[out]`` or None.
        compute_dtype: The dtype its matmuls want, or None (then the caller's rule decides).
    """

    in_features: int
    out_features: int
    bias: Tensor | None
    compute_dtype: torch.dtype | None

    @property
    def shape(self) -> torch.Size:
        """``(out_features, in_features)``."""
        ...

    def output(self, x2: Tensor, cd: torch.dtype) -> Tensor:
        """``x2 Wᵀ`` for ``x2 [N, in]`` in ``cd``: a new ``[N, out]`` in ``cd`` (no bias)."""
        ...

    def grad_input(self, dy: Tensor, cd: torch.dtype) -> Tensor:
        """``dY W`` for ``dy [N, out]`` in ``cd``: a new ``[N, in]`` in ``cd``."""
        ...

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        """``W [out, in]`` in ``dtype``."""
        ...


class LoraSpec(NamedTuple):
    """One adapted Linear: frozen base plus LoRA factors.

    Attributes:
        weight: Base weight ``[out, in]`` (usually frozen; fp32 or bf16), or a frozen
            :class:`QuantizedBase`.
        bias: Base bias ``[out]`` or None.
        lora_A: Down-projection ``[r, in]`` (fp32, trainable).
        lora_B: Up-projection ``[out, r]`` (fp32, trainable).
        scaling: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` for rsLoRA).
    """

    weight: Tensor | QuantizedBase
    bias: Tensor | None
    lora_A: Tensor
    lora_B: Tensor
    scaling: float


def draw_seed() -> int:
    """A dropout seed taken from torch's global RNG (so ``torch.manual_seed`` governs it)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def keep_mask(shape: torch.Size, p: float, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The 0/1 keep-mask of dropout ``p`` drawn from a private generator seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=gen)


def dropout_multiplier(x2: Tensor, explicit: Tensor | None, seed: int | None, p: float) -> Tensor | None:
    """The dropout multiplier for the flattened input ``x2 [N, in]`` (None without dropout)."""
    if explicit is not None:
        return explicit.reshape(x2.shape).to(x2.dtype)
    if seed is None:
        return None
    return keep_mask(x2.shape, p, seed, x2.device, x2.dtype)


def apply_dropout(t: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """``t ⊙ mask · scale`` (``scale`` is 1/(1-p) for a drawn 0/1 mask, 1 for an explicit one)."""
    if mask is None:
        return t
    out = t * mask
    return out.mul_(scale) if scale != 1.0 else out


def sum_dtype(weight: Any, cd: torch.dtype, wide: torch.dtype) -> torch.dtype:
    """The dtype an adapted Linear's output is summed in: ``wide`` for a quantized base, else ``cd``."""
    return cd if isinstance(weight, Tensor) else wide


def branches_forward(
    x2: Tensor,
    mask: Tensor | None,
    scale: float,
    params: Sequence[Any],
    scalings: Sequence[float],
    cd: torch.dtype,
    compute_output: bool = True,
    out_dtype: torch.dtype | None = None,
) -> tuple[list[Tensor], Tensor]:
    """Forward of k adapted Linears reading the same ``x2 [N, in]``.

    A full-precision weight's output is summed in ``cd``. A quantized base's output
    (base matmul in ``cd``, then bias and LoRA term) is summed in the wider of ``cd``
    and ``out_dtype`` (fp32 for an fp32 ``x`` or under autocast, :func:`prepare`), as
    PEFT over bitsandbytes' ``Linear4bit`` does (its output comes back in ``x``'s dtype
    and the LoRA term is added to it there): with bf16 compute the small LoRA term is
    not lost to the bf16 rounding of the base output.

    Args:
        x2: The flattened input ``[N, in]``, already in ``cd``.
        mask: Dropout multiplier of ``x2``'s shape (:func:`dropout_multiplier`) or None.
        scale: Multiplier applied with the mask (``1/(1-p)`` for a drawn 0/1 mask, else 1).
        params: The 4k entries ``[W, b, A, B] * k``, ``W`` a tensor or a :class:`QuantizedBase`
            (see the module docstring).
        scalings: The k LoRA scalings.
        cd: The compute dtype.
        compute_output: False computes only ``xa`` and leaves the outputs uninitialised.
        out_dtype: The dtype the caller returns the outputs in (None: ``cd``).

    Returns:
        The k outputs ``[N, out_i]`` (in ``cd``, or a quantized base's sum dtype) and the
        concatenated ``xa [N, R]``, ``R = Σ r_i``, from one down-projection matmul.
    """
    As = params[2::4]
    A = torch.cat([a.to(cd) for a in As]) if len(As) > 1 else As[0].to(cd)  # [R, in]
    xa = apply_dropout(x2, mask, scale) @ A.t()  # [N, R]
    wide = torch.promote_types(cd, out_dtype or cd)  # a quantized base's output is summed in this
    if not compute_output:  # a recompute whose outputs nothing reads: backward needs x and xa only
        return [x2.new_empty((x2.shape[0], W.shape[0]), dtype=sum_dtype(W, cd, wide)) for W in params[0::4]], xa
    outs, off = [], 0
    for (W, b, _, B), s in zip(zip(*[iter(params)] * 4), scalings):
        acc = sum_dtype(W, cd, wide)
        if isinstance(W, Tensor):
            Wt = W.to(cd).t()  # [in, out]
            y = x2 @ Wt if b is None else torch.addmm(b.to(cd), x2, Wt)  # [N, out]
        else:  # quantized: W dequantized (or int8 kernel) inside, for this call only
            y = W.output(x2, cd).to(acc)  # [N, out]
            if b is not None:
                y.add_(b.to(acc))
        r = B.shape[1]
        y.addmm_(xa[:, off : off + r].to(acc), B.to(acc).t(), alpha=s)  # += s·(xA_iᵀ)B_iᵀ, in place
        off += r
        outs.append(y)
    return outs, xa


def branches_backward(
    x2: Tensor,
    xa: Tensor,
    mask: Tensor | None,
    scale: float,
    params: Sequence[Any],
    scalings: Sequence[float],
    cd: torch.dtype,
    dys: Sequence[Tensor],
    needs: Sequence[bool],
    need_x: bool,
) -> tuple[Tensor | None, list[Tensor | None]]:
    """Backward of :func:`branches_forward`.

    Args:
        x2, xa, mask, scale, params, scalings, cd: As given to (and returned by) the forward.
        dys: The k output gradients ``[N, out_i]``.
        needs: 4k flags: which of W, b, A, B of each branch need a gradient (never a quantized W).
        need_x: Whether ``x2`` needs a gradient.

    Returns:
        ``(grad_x2 or None, [4k grads or None])``; parameter grads come back in
        their own dtype, ``grad_x2`` in ``cd``.
    """
    grads: list[Tensor | None] = []
    gs, gx, off = [], None, 0
    for i, ((W, b, _, B), s, dy) in enumerate(zip(zip(*[iter(params)] * 4), scalings, dys)):
        dy = dy.to(cd)  # [N, out]
        r = B.shape[1]
        gs.append((dy @ B.to(cd)).mul_(s))  # s·dY B: [N, r], small side first
        nW, nb, _, nB = needs[4 * i : 4 * i + 4]
        gW = (dy.t() @ x2).to(W.dtype) if nW else None  # [out, in], only if W trains
        gb = dy.sum(0, dtype=torch.float32).to(b.dtype) if nb else None  # [out]
        gB = (dy.t() @ xa[:, off : off + r]).mul_(s).to(B.dtype) if nB else None  # [out, r]
        grads += [gW, gb, None, gB]
        if need_x and isinstance(W, Tensor):  # Σ_i dY_i W_i accumulated in one buffer: [N, in]
            gx = dy @ W.to(cd) if gx is None else gx.addmm_(dy, W.to(cd))
        elif need_x:  # quantized: W dequantized again (never saved from forward)
            gx = W.grad_input(dy, cd) if gx is None else gx.add_(W.grad_input(dy, cd))
        off += r
    g = torch.cat(gs, 1) if len(gs) > 1 else gs[0]  # [N, R]
    As = params[2::4]
    A = torch.cat([a.to(cd) for a in As]) if len(As) > 1 else As[0].to(cd)  # [R, in]
    if any(needs[2::4]):
        gA = g.t() @ apply_dropout(x2, mask, scale)  # [R, in], one matmul for all branches
        for i, part in enumerate(gA.split([a.shape[0] for a in As])):
            grads[4 * i + 2] = part.to(As[i].dtype) if needs[4 * i + 2] else None
    if need_x:
        if mask is None:
            gx.addmm_(g, A)  # += s·(dY B) A: [N, r]·[r, in]
        else:
            gx.add_(apply_dropout(g @ A, mask, scale))  # dropout's mask gates the LoRA branch only
    return gx, grads


def prepare(
    x: Tensor,
    specs: Sequence[LoraSpec],
    dropout_p: float,
    training: bool,
    dropout_mask: Tensor | None,
    dtype: torch.dtype | None,
) -> tuple[Tensor | None, int | None, tuple[float, ...], torch.dtype, torch.dtype, list[Any]]:
    """Validate the arguments of a fused call and flatten ``specs`` into ``Function.apply``'s inputs.

    The matmuls run in ``dtype`` if given, else in a quantized base's own compute dtype
    (bitsandbytes' ``compute_dtype``, as its ``Linear4bit`` does), else in
    :func:`lorakit.precision.compute_dtype`'s (autocast's, else ``x``'s). Over
    full-precision weights the outputs come back in the compute dtype when it was asked
    for or autocast is on, else in ``x.dtype`` (the compute dtype anyway). Over quantized
    bases they come back in ``x.dtype``, as bitsandbytes' ``Linear4bit`` returns them
    (PEFT adds its LoRA term there), and under autocast in fp32 even for a bf16 ``x``
    (o_proj reads the attention's bf16 output): the base matmul runs in bf16, the sum
    with the LoRA term and what goes on into the fp32 residual stream stay fp32.

    Args:
        x: The input ``[..., in]``.
        specs: One :class:`LoraSpec` per branch.
        dropout_p: LoRA dropout, in ``[0, 1)``.
        training: Dropout applies only when True.
        dropout_mask: An explicit multiplier of ``x``'s shape, or None.
        dtype: The requested compute dtype, or None.

    Returns:
        ``(mask, seed, scalings, compute dtype, output dtype, params)``: the explicit
        mask if dropout applies (else None), a fresh seed when dropout applies without
        one (else None), the k scalings, the two dtypes and the 4k flat parameters.

    Raises:
        ConfigError: ``dropout_p`` outside ``[0, 1)``.
        ModelMismatchError: a weight or LoRA factor does not fit ``x``.
        ValueError: no specs, or a ``dropout_mask`` not of ``x``'s shape.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {dropout_p}")
    if not specs:
        raise ValueError("lora_linear_multi needs at least one LoraSpec, got none")
    for spec in specs:
        W, A, B = spec.weight, spec.lora_A, spec.lora_B
        if W.shape[1] != x.shape[-1] or A.shape[1] != x.shape[-1] or B.shape != (W.shape[0], A.shape[0]):
            kind = "weight" if isinstance(W, Tensor) else "quantized base"
            raise ModelMismatchError(
                f"LoRA shapes do not fit: x [..., {x.shape[-1]}], {kind} {tuple(W.shape)}, "
                f"lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}; expected weight [out, in], "
                f"lora_A [r, in], lora_B [out, r]"
            )
    if dropout_mask is not None and dropout_mask.shape != x.shape:
        raise ValueError(f"dropout_mask must have x's shape {tuple(x.shape)}, got {tuple(dropout_mask.shape)}")
    use_drop = training and dropout_p > 0.0
    mask = dropout_mask if use_drop else None
    seed = draw_seed() if use_drop and mask is None else None
    params = [t for spec in specs for t in (spec.weight, spec.bias, spec.lora_A, spec.lora_B)]
    scalings = tuple(float(spec.scaling) for spec in specs)
    own = (getattr(spec.weight, "compute_dtype", None) for spec in specs if not isinstance(spec.weight, Tensor))
    cd = dtype or next((d for d in own if d is not None), None) or compute_dtype(x, None)
    dev = x.device.type
    autocast = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)
    if any(not isinstance(spec.weight, Tensor) for spec in specs):  # x's dtype; under autocast at least fp32
        out_dtype = torch.promote_types(x.dtype, torch.float32) if autocast else x.dtype
    else:
        out_dtype = cd if dtype is not None or autocast else x.dtype
    return mask, seed, scalings, cd, out_dtype, params


def saveable(params: Sequence[Any]) -> tuple[list[Tensor | None], dict[int, QuantizedBase]]:
    """Split flat parameters into what ``ctx.save_for_backward`` takes and the quantized bases.

    Args:
        params: The 4k entries of :func:`prepare`.

    Returns:
        ``(tensors, bases)``: ``params`` with every quantized base replaced by None, and
        those bases by position (kept on ``ctx``: they hold no activation).
    """
    bases = {i: p for i, p in enumerate(params) if p is not None and not isinstance(p, Tensor)}
    return [None if i in bases else p for i, p in enumerate(params)], bases


def restore(saved: Sequence[Tensor | None], bases: dict[int, QuantizedBase]) -> list[Any]:
    """The flat parameters again from :func:`saveable`'s two parts (``saved`` as ``ctx.saved_tensors`` gives it)."""
    return [bases.get(i, t) for i, t in enumerate(saved)]
