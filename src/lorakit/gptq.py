"""GPTQ weight rounding (Frantar et al. 2022) for lorakit's per-channel int8 codes.

Round to nearest picks each weight code alone. GPTQ picks them column by column
(input channel by input channel) and pushes each column's rounding error onto
the columns not yet rounded, weighted by how the layer's inputs correlate, so
that the layer's *output* on those inputs moves as little as it can: it
minimizes ``‖X Wᵀ − X Ŵᵀ‖`` greedily, given ``H = XᵀX`` of calibration inputs.
The scales are those of round to nearest (:func:`lorakit.int8.quantize_weight_int8`:
``max |w| / code_max`` per output channel) and the codes stay in
``[-code_max, code_max]``, so the kernels and the layer are unchanged; only
which code each weight gets differs.

It pays where the codes are coarse: on CPUs whose int8 kernel saturates
(AVX2 without VNNI) lorakit keeps 63 codes a side, and there GPTQ cut the KL
divergence of the default model's logits to fp32's by 20-36%; with 127 codes
it gained nothing (benchmarks/RESULTS.md, "int8_schemes").
:func:`lorakit.int8_model.quantize_int8` calls it (``rounding="auto"``
chooses it where :func:`lorakit.int8.weight_code_max` is 63).

This is the blocked form of the paper's algorithm: the inverse Hessian's upper
Cholesky factor ``U`` (``H⁻¹ = UᵀU``) gives every column's update at once, errors
are pushed within a block of columns one column at a time and onto the rest
of the matrix once per block (one matmul).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .int8 import quantize_weight_int8

__all__ = ["DAMP", "BLOCK", "gptq_quantize"]

# Damping added to H's diagonal, as a fraction of its mean: the paper's 0.01 assumes 128 x 2048 calibration
# tokens; lorakit calibrates on a few hundred, fewer than a down projection's 1536 inputs (H is then singular),
# and 0.1 measured as good or better there (benchmarks/RESULTS.md, "int8_schemes").
DAMP = 0.1
BLOCK = 32  # columns per block: the one-at-a-time pushes cost block x columns x rows, the rest is one matmul


def gptq_quantize(
    weight: Tensor, gram: Tensor, code_max: int, damp: float = DAMP, block: int = BLOCK
) -> tuple[Tensor, Tensor]:
    """Int8 codes for ``weight`` chosen by GPTQ against the inputs whose Gram matrix is ``gram``.

    Args:
        weight: ``[out, in]``, any float dtype.
        gram: ``XᵀX`` ``[in, in]`` of calibration inputs (float64 preferred), symmetric positive semi-definite.
        code_max: The largest code (127, or 63 on CPUs whose int8 kernel saturates).
        damp: Added to the diagonal: ``damp * mean(diag(H))``.
        block: Columns whose errors are pushed one at a time before one matmul updates the rest.

    Returns:
        ``(codes int8 [out, in], scale fp32 [out])``: the scale is round to nearest's
        (:func:`lorakit.int8.quantize_weight_int8`), so ``scale[:, None] * codes`` approximates ``weight``.
        An input channel that never fired (zero diagonal in ``gram``) is rounded to nearest.

    Raises:
        ValueError: shapes that do not match, or a ``damp`` that is not positive.
    """
    out_f, in_f = weight.shape
    if gram.shape != (in_f, in_f):
        raise ValueError(f"gram must be [{in_f}, {in_f}] for a [{out_f}, {in_f}] weight, got {list(gram.shape)}")
    if not damp > 0:
        raise ValueError(f"damp must be positive, got {damp}")
    _, scale = quantize_weight_int8(weight, code_max)
    u = _inverse_factor(gram, damp).float()
    # Columns as rows, in units of each output channel's scale: a column's codes, its error and the
    # rank-1 update of the next columns are contiguous vectors; fp32, as the paper's implementation.
    w = (weight.detach().double() / scale.double()[:, None]).t().float().contiguous()  # [in, out]
    errs = torch.empty(block, out_f)
    for b in range(0, in_f, block):
        e = min(b + block, in_f)
        wb, ub, eb = w[b:e], u[b:e, b:e], errs[: e - b]
        for i in range(e - b):
            q = wb[i].round().clamp_(-code_max, code_max)
            torch.sub(wb[i], q, out=eb[i]).div_(ub[i, i])
            wb[i] = q  # the block's rows end up as its codes
            if i + 1 < e - b:
                wb[i + 1 :].addr_(ub[i, i + 1 :], eb[i], alpha=-1)
        if e < in_f:
            w[e:].addmm_(u[b:e, e:].t(), eb, alpha=-1)
    return w.t().to(torch.int8).contiguous(), scale


def _inverse_factor(gram: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹ = UᵀU`` in float64, channels that never fired decoupled.

    With ``P`` the order reversal, ``PHP = LLᵀ`` (Cholesky) gives ``H = (PLP)(PLP)ᵀ`` with ``PLP`` upper
    triangular, so ``U = (PLP)⁻¹ = P L⁻¹ P``: one factorization and one triangular solve, half the work
    of inverting ``H`` and factoring the inverse.
    """
    h = gram.detach().double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1  # no correlation, so no error goes anywhere from (or to) a channel that never fired
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    lower = torch.linalg.cholesky(h.flip(0, 1))
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
