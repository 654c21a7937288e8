"""An output head with int8 weights for inference (``--quantize int8``): the widest matmul of a decoding step.

At batch 1 a decoding step reads every weight once, and the output head is the largest
of them (the default model's 49,152 x 576: 113 MB in fp32, more than its 30 int8
decoder layers together). MKL's one-row sgemv streams it at about half this machine's
memory bandwidth: 10 ms a token on the project's 2-core EPYC, a quarter of an int8
decoding step. :class:`Int8Head` keeps the head as int8 codes with one fp32 scale per
vocabulary row (127 codes a side: only the weights are quantized, so no int8 kernel
saturates and every CPU gets 8 bits) and computes in fp32:

* up to :data:`ROWS_MAX` rows (decoding steps): an inductor-compiled loop (:mod:`lorakit.compiled`)
  that widens each vocabulary row's codes in registers and reduces them against each row of
  ``x``: about 1-1.3 ms a row (10 ms for fp32's sgemv; 2 / 4 / 8 rows: 2.2 / 3.9 / 7.2 ms,
  against about 4 / 8 / 11 ms for fp32 even taken as ``(W·xᵀ)ᵀ``, :mod:`lorakit.few_rows`);
* more rows (a prompt, ``eval``), or where the compiled loop cannot run: vocabulary blocks of
  :data:`BLOCK` rows whose codes are widened to fp32 while in cache, each multiplied by
  ``F.linear`` (as ``(Q·xᵀ)ᵀ`` up to :data:`ROWS_MAX` rows, where MKL's few-row sgemm is slow),
  the scales applied to the block's outputs: about fp32's time from 64 rows up.

Activations stay fp32: the head's weights alone in int8 cost a KL divergence per token
of about 0.001 on the default model, against 0.0055 with per-row int8 activations too
(benchmarks/RESULTS.md, "int8_schemes"). Training keeps the head fp32 (its input
gradient reaches every layer); :func:`lorakit.int8_model.quantize_for_inference` swaps it in.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .compiled import checked_kernel

__all__ = ["BLOCK", "ROWS_MAX", "Int8Head", "one_row_kernel_runs"]

BLOCK = 2048  # vocabulary rows per dequantized block (fp32 [2048, 576]: 4.5 MiB, in cache while multiplied)
ROWS_MAX = 8  # rows the compiled loop takes (it reads the codes once per row: beyond 8 blocks are faster)
CODE_MAX = 127  # weights only: no integer kernel to saturate


def _row_product(x: Tensor, codes: Tensor, scale: Tensor) -> Tensor:
    """``x (diag(scale) Q)ᵀ`` as one reduction per vocabulary row: ``x [R, K]`` fp32, ``Q [V, K]`` int8, ``[V]``."""
    return (x[:, None, :] * codes.to(torch.float32)).sum(-1) * scale


def _probes() -> list[tuple[Tensor, Tensor, Tensor]]:
    g = torch.Generator().manual_seed(0)
    probes = []
    for v, k in ((5, 8), (67, 600)):  # below and well above one vector's width
        codes = torch.randint(-CODE_MAX, CODE_MAX + 1, (v, k), generator=g, dtype=torch.int8)
        probes.append((torch.randn(1, k, generator=g), codes, torch.rand(v, generator=g) + 0.01))
    return probes


def _close(got: Tensor, want: Tensor) -> bool:
    return torch.allclose(got, want, rtol=1e-5, atol=1e-3)  # sums of 600 terms of size ~127: fp32 rounding


@functools.cache
def _row_kernel():  # noqa: ANN202 - a compiled callable, or None
    """The compiled one-row product, or None (built and checked once per process)."""
    return checked_kernel(
        _row_product, _probes(), _close, "the int8 head's one-row product runs block by block", "LORAKIT_INT8_FUSED"
    )


def one_row_kernel_runs() -> bool:
    """Whether the compiled one-row loop runs here (without it a decoding step's head is slower than fp32's)."""
    return _row_kernel() is not None


class Int8Head(nn.Module):
    """A frozen Linear (an output head) as int8 codes ``Q [out, in]`` and fp32 scales ``[out]``: ``W ≈ diag(s) Q``.

    Buffers: ``qweight`` int8, ``weight_scale`` fp32; ``bias`` fp32 or None. The output comes back
    in ``x``'s dtype, contiguous, as ``F.linear``'s. With autograd recording (``x`` requires grad)
    it takes the block path, which autograd differentiates with respect to ``x``; the weights never
    get a gradient.

    Attributes:
        in_features: Input width.
        out_features: Output width (the vocabulary).
    """

    def __init__(self, codes: Tensor, scale: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("qweight", codes)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Head:
        """Round an ``nn.Linear``'s weight to the nearest of 255 codes per row (scale: the row's largest
        magnitude over 127; an all-zero row gets scale 1)."""
        w = linear.weight.detach().float()
        amax = w.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / CODE_MAX, torch.ones_like(amax))
        codes = torch.round(w / scale[:, None]).clamp_(-CODE_MAX, CODE_MAX).to(torch.int8)
        return cls(codes, scale, linear.bias)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``diag(weight_scale) Q`` as ``[out, in]`` in ``dtype``."""
        return (self.qweight.float() * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        few = x2.shape[0] <= ROWS_MAX
        graph = torch.is_grad_enabled() and x.requires_grad
        kernel = _row_kernel() if few and x2.device.type == "cpu" and not graph else None
        if kernel is not None:
            with torch.no_grad():  # one grad mode, so one compiled entry
                y = kernel(x2, self.qweight, self.weight_scale)
        else:
            y = x2.new_empty(x2.shape[0], self.out_features)
            for i in range(0, self.out_features, BLOCK):
                codes = self.qweight[i : i + BLOCK].float()  # [B, in]: the codes widened, while in cache
                part = (codes @ x2.t()).t() if few else F.linear(x2, codes)  # [N, B]
                y[:, i : i + BLOCK] = part.mul_(self.weight_scale[i : i + BLOCK])  # the scales on the output
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"
