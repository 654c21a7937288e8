"""Per-row int8 quantization of activations, in one fused pass where torch can compile it.

Every int8 matmul (:mod:`lorakit.int8`) quantizes its float operand per row on the
fly: ``x ≈ s (q - 128)`` with ``s`` the row's largest magnitude over 127, often of
``x diag(c)`` (SmoothQuant's column factors, or the weight scales folded into a
gradient). In eager torch that is five passes over ``x`` and two full-size fp32
temporaries (scale the columns, max, min, ``x / s + 128.5``, the cast to u8), which
on the default model's [T, 1536] MLP tensors cost as much as a third of the int8
GEMM itself. Compiled by inductor (``torch.compile``, one kernel: a row reduction,
then the scaled, rounded u8 write) the same math reads ``x`` twice and writes only
the codes: 3-5x faster on a CPU (benchmarks/RESULTS.md, "int8_schemes").

The compiled form is built on first use and checked against the eager math on
small probes (:func:`lorakit.compiled.checked_kernel`); where inductor cannot compile
(no C++ compiler, an unsupported platform; one warning) or ``LORAKIT_INT8_FUSED=0``
is set, the eager passes run instead. Codes agree with the eager ones up to a
rounding tie (one code step).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .compiled import checked_kernel

__all__ = ["ZERO_POINT", "quantize_rows", "fused_quantizer"]

ZERO_POINT = 128  # u8 activation codes are the int8 codes + 128 (oneDNN's fast x86 path is u8 x s8)
_HALF_ZP = torch.tensor(ZERO_POINT + 0.5)  # addcmul's base, made once: the eager path runs per matmul


def _rows_math(x2: Tensor, col_scale: Tensor) -> tuple[Tensor, Tensor]:
    """``x2 diag(col_scale)`` quantized per row: ``(q uint8, s fp32 [N, 1])``; the body compiled as one kernel."""
    x = x2.float() * col_scale
    amax = x.abs().amax(dim=1, keepdim=True)
    s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    # floor(v + 128.5) = round(v) + 128 for |v| <= 127 (the cast truncates): codes in [1, 255]
    q = (x * s.reciprocal() + (ZERO_POINT + 0.5)).to(torch.uint8)
    return q, s


def _eager(x2: Tensor, in_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """The same math in eager passes, without the column multiply when there is no ``in_scale``."""
    x = x2.float() if in_scale is None else x2.float() * in_scale
    amax = torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg_())  # faster than aminmax
    s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.addcmul(_HALF_ZP, x, s.reciprocal()).to(torch.uint8)
    return q, s


def _probes() -> list[tuple[Tensor, Tensor]]:
    """Inputs below and well above one vector's width, columns of very different sizes, an all-zero row."""
    g = torch.Generator().manual_seed(0)
    probes = []
    for n, k in ((6, 8), (67, 600)):
        probe = torch.randn(n, k, generator=g) * torch.logspace(-2, 2, k)
        probe[2] = 0.0  # an all-zero row: scale 1, codes 128
        probes.append((probe, torch.rand(k, generator=g) + 0.5))
    return probes


def _same_codes(got: Tensor, want: Tensor) -> bool:
    """Codes equal up to a rounding tie (one step); scales to float rounding."""
    if got.dtype == torch.uint8:
        return bool((got.int() - want.int()).abs().max() <= 1)
    return torch.allclose(got, want, rtol=1e-6, atol=0)


@functools.cache
def fused_quantizer():  # noqa: ANN201 - a compiled callable, or None
    """The compiled quantizer, or None where it cannot run here (built and checked once per process).

    Returns:
        A callable ``(x2, col_scale) -> (q, s)`` (inductor's one-kernel form), or None: use the eager passes.
    """
    return checked_kernel(
        _rows_math, _probes(), _same_codes, "int8 activations are quantized in eager passes", "LORAKIT_INT8_FUSED"
    )


@functools.cache
def _ones(k: int, device: torch.device) -> Tensor:
    with torch.inference_mode(False):  # an ordinary tensor even when first asked for while decoding
        return torch.ones(k, device=device)


def quantize_rows(x2: Tensor, in_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantization per row, as u8 codes with zero point 128: ``x ≈ s * (q - 128)``.

    One compiled kernel on a CPU where inductor works (:func:`fused_quantizer`), else the eager
    passes: max and min per row, ``x / s + 128.5`` and the cast to u8 (which truncates:
    ``floor(v + 128.5) = round(v) + 128`` for ``|v| <= 127``, rounding ties up instead of to even).

    Args:
        x2: ``[N, K]`` float.
        in_scale: Optional fp32 ``[K]``: quantize ``x2 * in_scale`` (SmoothQuant's ``1 / s``, or weight scales).

    Returns:
        ``(q uint8 [N, K], s fp32 [N, 1])``; an all-zero row gets scale 1.
    """
    fused = fused_quantizer() if x2.device.type == "cpu" and x2.shape[0] > 1 else None
    if fused is None:
        return _eager(x2, in_scale)
    # codes carry no gradient; one grad mode, one requires_grad flag and one autocast state (training steps turn
    # autocast's cache off), so one compiled entry serves training, eval and the calibration
    with torch.no_grad(), torch.autocast("cpu", enabled=False, cache_enabled=False):
        return fused(x2.detach(), _ones(x2.shape[1], x2.device) if in_scale is None else in_scale)
