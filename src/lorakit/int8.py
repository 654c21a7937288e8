"""Int8 frozen bases: both matmuls of a frozen Linear in int8, for training (``train.precision: int8``) and inference.

The frozen base weight needs no gradient, so both of its matmuls can run on
8-bit integers (SwitchBack, Wortsman et al. 2023; LLM.int8, Dettmers et al.
2022): the weight is stored as int8 codes with one fp32 scale per output
channel, ``W ≈ diag(w) Q``, and each matmul quantizes its float operand per row
on the fly, multiplies int8 by int8 into int32 accumulators and scales the
result back to fp32:

* forward ``y = x Wᵀ``: ``x ≈ diag(s) P`` (``s`` per row of ``x``), ``y = diag(s) (P Qᵀ) diag(w)``;
* input gradient ``dY W``: the per-channel scale is folded into ``dY`` first,
  ``dY diag(w) ≈ diag(t) R`` (``t`` per row), ``dY W = diag(t) (R Q)``.

Per-row scales matter: one scale per tensor (what torch's ``quantize_dynamic``
does) wrecks the default model (benchmarks/RESULTS.md, "int8_schemes").

The kernel is oneDNN's int8 matmul as torch exposes it for inductor's x86 int8
lowering (``torch.ops.onednn.qlinear_prepack`` / ``qlinear_pointwise``): u8
activations (codes + 128, zero point 128), s8 weights prepacked once per
direction (the second copy, ``Qᵀ`` packed, exists only once a backward has run),
int32 accumulation (VNNI on AVX512-VNNI / AVX-VNNI / AMX CPUs), fp32 output with
the weight scale applied; exact up to the final fp32 scaling. One row at a time
(greedy decoding) it costs more than fp32, so a single row goes to fbgemm's
dynamic int8 linear instead (one activation scale per call = per row there; its
own packed copy, made on first use). Every kernel call is in this module
(:func:`int8_matmul`, :func:`int8_matmul_row`), so tests can check which kernel
runs, and another kernel (torchao, a CUDA one) would replace those two functions.
Measurements of every candidate: benchmarks/RESULTS.md, "int8_schemes".

:class:`Int8Linear` is the frozen layer (no grad, fp32 bias); :class:`Base8bit`
gives lorakit's LoRA ops the :class:`~lorakit.quant.QuantizedBase` interface over it,
so LoRA layers and their fusions need no int8 branch. :mod:`lorakit.int8_model`
swaps a loaded model's Linear layers for them.
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .row_quant import ZERO_POINT, quantize_rows

__all__ = [
    "INT8_ALTERNATIVE",
    "int8_support",
    "require_int8",
    "quantize_weight_int8",
    "weight_code_max",
    "quantize_rows",
    "int8_matmul",
    "int8_matmul_row",
    "Int8Linear",
    "Base8bit",
    "measured_speedup",
]

INT8_ALTERNATIVE = "train.precision: fp32 (or bf16 on a CPU with AVX512-BF16/AMX), or --quantize none"


# ----------------------------------------------------------------------------- can this machine do it


@functools.cache
def int8_support() -> str | None:
    """Why int8 matmuls cannot run here, or None when they can (checked once per process).

    Returns:
        None when torch has the oneDNN int8 ops and they run on this CPU; else a reason.
    """
    ops = getattr(torch.ops, "onednn", None)
    if ops is None or not hasattr(ops, "qlinear_pointwise") or not hasattr(ops, "qlinear_prepack"):
        return f"this torch build ({torch.__version__}) has no oneDNN int8 linear ops (torch.ops.onednn.qlinear_*)"
    if not torch.backends.mkldnn.is_available():
        return f"this torch build ({torch.__version__}) was built without oneDNN (mkldnn)"
    try:
        q = torch.full((2, 4), 130, dtype=torch.uint8)
        w = torch.ops.onednn.qlinear_prepack(torch.ones(3, 4, dtype=torch.int8), [2, 4])
        y = _qlinear(q, w, torch.ones(3), torch.zeros(3, dtype=torch.int64))
    except RuntimeError as e:  # e.g. a CPU without the instructions oneDNN's int8 kernels need
        return f"oneDNN's int8 matmul does not run on this machine ({str(e).splitlines()[0]})"
    if not torch.equal(y, torch.full((2, 3), 8.0)):
        return "oneDNN's int8 matmul gave a wrong result on this machine"
    return None


def require_int8(what: str = "int8 matmuls") -> None:
    """Raise a clear error when int8 matmuls cannot run here.

    Args:
        what: What asked for them, for the message.

    Raises:
        ConfigError: no usable int8 kernel (the message names what to use instead).
    """
    why = int8_support()
    if why is not None:
        raise ConfigError(f"{what} need oneDNN's int8 kernels, but {why}; use {INT8_ALTERNATIVE}.")


# ----------------------------------------------------------------------------- quantization and the kernel


@functools.cache
def weight_code_max() -> int:
    """The largest weight code this CPU's int8 kernel multiplies exactly: 127, or 63 where it saturates.

    Without VNNI (AVX512-VNNI, AVX-VNNI) or AMX, x86 int8 kernels multiply u8 x s8 with
    ``vpmaddubsw``, which adds each pair of products into a saturating int16: a u8 code
    of 255 against weights of 127 gives 64770, clipped to 32767 (on an AVX2-only CPU,
    oneDNN's int8 matmul of random data was 7-8% off the exact integer result). Weight
    codes of at most 63 keep every pair below 2^15 (255 * 63 * 2 = 32130): the weights lose
    one bit, the kernel is exact. Probed once per process on the kernel itself, so it also
    holds where oneDNN is told to use fewer instructions (``ONEDNN_MAX_CPU_ISA``).

    Returns:
        127 where a saturating pair comes out exact (or int8 cannot run here), else 63.
    """
    if int8_support() is not None:
        return 127
    q = torch.full((1, 2), 255, dtype=torch.uint8)  # x codes +127 (zero point 128)
    w = torch.ops.onednn.qlinear_prepack(torch.full((1, 2), 127, dtype=torch.int8), [1, 2])
    y = _qlinear(q, w, torch.ones(1), torch.zeros(1, dtype=torch.int64))
    return 127 if float(y) == 127.0 * 127.0 * 2 else 63


def quantize_weight_int8(weight: Tensor, code_max: int | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric int8 codes per output channel: ``W ≈ scale[:, None] * codes``.

    Args:
        weight: ``[out, in]``, any float dtype (quantized from its fp32 values).
        code_max: The largest code; None: :func:`weight_code_max` (127, or 63 on a CPU whose int8
            kernel saturates).

    Returns:
        ``(codes int8 [out, in] in [-code_max, code_max], scale fp32 [out])``; an all-zero row gets scale 1.
    """
    top = float(weight_code_max() if code_max is None else code_max)
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    codes = torch.round(w / scale[:, None]).clamp_(-top, top).to(torch.int8)
    return codes, scale


def _qlinear(q: Tensor, packed: Tensor, w_scale: Tensor, w_zp: Tensor) -> Tensor:
    """oneDNN: fp32 ``(q - 128) Qᵀ · w_scale`` (int32 accumulation), ``q`` u8 ``[N, K]``, ``Q`` packed ``[M, K]``."""
    return torch.ops.onednn.qlinear_pointwise(
        q, 1.0, ZERO_POINT, packed, w_scale, w_zp, None, 1.0, 0, torch.float32, "none", [], ""
    )


class _LastRows(threading.local):
    """The last input quantized by :func:`int8_matmul` in this thread, and its codes.

    q/k/v (and gate/up) read one ``x``: the second and third call reuse the codes. The
    input is kept alive while cached, so its address cannot be another tensor's;
    its version counter (and the SmoothQuant scale's) tells whether it was written to since.
    """

    entry: tuple[Tensor, int, Tensor | None, int, Tensor, Tensor] | None = None

    def get(self, x2: Tensor, in_scale: Tensor | None) -> tuple[Tensor, Tensor] | None:
        e = self.entry
        if e is None:
            return None
        x, version, scale, scale_version, q, s = e
        same = x.data_ptr() == x2.data_ptr() and x.shape == x2.shape and x.stride() == x2.stride()
        same = same and x.dtype == x2.dtype and version == x2._version and scale is in_scale
        return (q, s) if same and (scale is None or scale._version == scale_version) else None

    def put(self, x2: Tensor, in_scale: Tensor | None, q: Tensor, s: Tensor) -> None:
        self.entry = (x2, x2._version, in_scale, -1 if in_scale is None else in_scale._version, q, s)


_LAST = _LastRows()


def int8_matmul(
    x2: Tensor,
    packed: Tensor,
    col_scale: Tensor,
    col_zp: Tensor,
    reuse: bool = False,
    in_scale: Tensor | None = None,
) -> Tensor:
    """``(x2 diag(in_scale)) Qᵀ diag(col_scale)``, ``x2`` quantized per row: the oneDNN int8 kernel's one call.

    Args:
        x2: ``[N, K]`` float.
        packed: ``Q [M, K]`` int8, prepacked by ``torch.ops.onednn.qlinear_prepack``.
        col_scale: fp32 ``[M]``, applied to the int32 accumulators' columns.
        col_zp: int64 zeros ``[M]`` (oneDNN's weight zero points).
        reuse: Reuse the codes of the last call when it quantized this very ``x2`` (unchanged since)
            with this very ``in_scale`` tensor.
        in_scale: Optional fp32 ``[K]`` multiplying ``x2``'s columns before quantization (SmoothQuant).

    Returns:
        ``[N, M]`` fp32: ``s_r · col_scale_c · Σ_k (q_rk - 128) Q_ck``.
    """
    reuse = reuse and not x2.is_inference()  # inference-mode tensors have no version counter
    got = _LAST.get(x2, in_scale) if reuse else None
    if got is None:
        got = quantize_rows(x2, in_scale)
        if reuse:
            _LAST.put(x2, in_scale, *got)
    q, s = got
    return _qlinear(q, packed, col_scale, col_zp).mul_(s)


@functools.cache
def _has_row_kernel() -> bool:
    """Whether fbgemm's dynamic int8 linear (the one-row decoding kernel) runs here."""
    try:
        layer = _fbgemm_pack(torch.ones(3, 4, dtype=torch.int8), torch.ones(3))
        return torch.equal(torch.ops.quantized.linear_dynamic(torch.ones(1, 4), layer, False), torch.full((1, 3), 4.0))
    except (RuntimeError, AttributeError):
        return False


def _fbgemm_pack(codes: Tensor, scale: Tensor) -> Any:
    """fbgemm's packed form of the same int8 codes and per-channel scales (no requantization)."""
    with warnings.catch_warnings():  # torch marks its quantized-tensor API deprecated; the op itself is current
        warnings.simplefilter("ignore")
        zeros = torch.zeros(codes.shape[0], dtype=torch.int64)
        qw = torch._make_per_channel_quantized_tensor(codes, scale.double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(qw, None)


def int8_matmul_row(x1: Tensor, packed: Any) -> Tensor:
    """``x1 Wᵀ`` for ONE row (decoding): fbgemm's dynamic int8 linear, whose one activation scale is that row's.

    oneDNN's int8 matmul costs more than fp32 at one row (per-call overhead); fbgemm's
    ``quantized::linear_dynamic`` quantizes, multiplies and dequantizes in one call, about
    0.3-0.5x the fp32 time. Its activation quantization is asymmetric (min/max, u8), as fine
    as the symmetric one or finer.

    Args:
        x1: ``[1, K]`` float.
        packed: From :func:`_fbgemm_pack`.

    Returns:
        ``[1, M]`` fp32.
    """
    return torch.ops.quantized.linear_dynamic(x1.float(), packed, False)


# ----------------------------------------------------------------------------- the frozen layer


class Int8Linear(nn.Linear):
    """A frozen Linear with int8 weights (per-output-channel scales) and both matmuls in int8.

    Buffers: ``qweight`` int8 ``[out, in]``, ``weight_scale`` fp32 ``[out]``; ``bias`` fp32
    (frozen) or None; ``input_scale`` fp32 ``[in]`` or None: SmoothQuant's ``1 / s`` (Xiao et al.
    2023), with ``W diag(s)`` quantized and ``x diag(1 / s)`` multiplied, so outlier input
    channels are tamed before the per-row quantization (:func:`lorakit.int8_model.quantize_int8`
    calibrates ``s``; siblings reading one input share one tensor). The oneDNN-packed
    copies (``Q`` for forward, ``Qᵀ`` for the input gradient, each one byte per weight)
    are made on first use and dropped when the module moves (``_apply``). Once both
    exist (training), the codes buffer goes: a step needs only the packs, and
    :meth:`codes` rebuilds ``Q`` from the packed ``Qᵀ`` for whatever else asks
    (dequantizing, merging, one-row decoding, a move). It is an
    ``nn.Linear`` (as bitsandbytes' layers are) so that target matching (``all-linear``)
    and LoRA wrapping treat it as one; it holds no float weight (``weight`` is a
    dequantized copy made on each read, for code outside the LoRA op that wants one).

    Attributes:
        in_features: Input width.
        out_features: Output width.
        rounding: How the codes were chosen: ``"nearest"`` (:func:`quantize_weight_int8`) or ``"gptq"``
            (:mod:`lorakit.gptq`, by :func:`lorakit.int8_model.quantize_int8`).
    """

    def __init__(
        self,
        codes: Tensor,
        scale: Tensor,
        bias: Tensor | None,
        input_scale: Tensor | None = None,
        rounding: str = "nearest",
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: no float weight
        self.out_features, self.in_features = codes.shape
        self.rounding = rounding  # how the codes were chosen: "nearest" or "gptq" (lorakit.gptq); for logs
        self.register_buffer("qweight", codes)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("input_scale", input_scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self._packed: dict[str, Any] = {}

    @classmethod
    def from_linear(cls, linear: nn.Module, smooth: Tensor | None = None) -> Int8Linear:
        """Quantize an ``nn.Linear`` (or GPT-2 ``Conv1D``, stored ``[in, out]``).

        Args:
            linear: The layer.
            smooth: Optional SmoothQuant factors ``s`` ``[in]`` (positive): ``W diag(s)`` is quantized.
        """
        weight = linear.weight.detach().float()
        if type(linear).__name__ == "Conv1D":
            weight = weight.t()
        if smooth is None:
            return cls(*quantize_weight_int8(weight), linear.bias)
        smooth = smooth.float()
        return cls(*quantize_weight_int8(weight * smooth), linear.bias, smooth.reciprocal())

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        if self.qweight is None:  # the codes back from the pack before the packs go
            self.qweight = self.codes()
        self._packed = {}
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001 - nn.Module's signature
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qweight is None:  # dropped in training: a state dict still holds the codes
            destination[prefix + "qweight"] = self.codes()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if self.qweight is None:  # a buffer to load the codes into
            self.qweight = self.codes()
        self._packed = {}  # packs of the old codes
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def codes(self) -> Tensor:
        """The int8 codes ``Q [out, in]``: the ``qweight`` buffer, or a copy from the pack of ``Qᵀ`` once dropped.

        Returns:
            int8 ``[out, in]`` (a new tensor when rebuilt: oneDNN's dense reorder of the packed ``Qᵀ``, exact).
        """
        if self.qweight is not None:
            return self.qweight
        return self._packed["grad_input"][0].to_dense()  # the pack of Qᵀ [in, out] reads back as Q [out, in]

    def packed(self, direction: str) -> tuple[Tensor, Tensor, Tensor]:
        """``(packed codes, column scale, zero points)`` for ``"forward"`` (``Q``) or ``"grad_input"`` (``Qᵀ``)."""
        got = self._packed.get(direction)
        if got is None:
            q = self.codes() if direction == "forward" else self.codes().t().contiguous()
            if direction == "forward":
                scale = self.weight_scale
            else:  # dY W = (dY diag(w) Q) diag(input_scale)
                scale = torch.ones(q.shape[0]) if self.input_scale is None else self.input_scale
            zp = torch.zeros(q.shape[0], dtype=torch.int64)
            got = self._packed[direction] = (torch.ops.onednn.qlinear_prepack(q, None), scale.float(), zp)
            if "forward" in self._packed and "grad_input" in self._packed:
                self.qweight = None  # training: a third copy of the weight no step reads (codes() rebuilds it)
        return got

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        """A dequantized fp32 copy ``[out, in]`` (new on every read; the LoRA op never reads it)."""
        return self.dequantized(torch.float32)

    def as_quantized_base(self) -> Base8bit:
        """What :func:`lorakit.quant.quantized_base` hands the LoRA op for this layer."""
        return Base8bit(self)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``W ≈ diag(weight_scale) Q diag(input_scale)`` as ``[out, in]`` in ``dtype``."""
        w = self.codes().float() * self.weight_scale[:, None]
        return (w if self.input_scale is None else w * self.input_scale).to(dtype)

    def output(self, x2: Tensor) -> Tensor:
        """``x2 Wᵀ`` (no bias) for ``x2 [N, in]``: fp32 ``[N, out]`` (one row, when decoding: fbgemm's kernel)."""
        if x2.shape[0] == 1 and _has_row_kernel():
            row = self._packed.get("row")
            if row is None:
                row = self._packed["row"] = _fbgemm_pack(self.codes(), self.weight_scale)
            return int8_matmul_row(x2 if self.input_scale is None else x2 * self.input_scale, row)
        # siblings reading one x (and sharing one input_scale) share its codes
        return int8_matmul(x2, *self.packed("forward"), reuse=True, in_scale=self.input_scale)

    def grad_input(self, dy: Tensor) -> Tensor:
        """``dY W`` for ``dy [N, out]``: fp32 ``[N, in]`` (the weight scale folded into ``dY`` first)."""
        return int8_matmul(dy, *self.packed("grad_input"), in_scale=self.weight_scale)

    def forward(self, x: Tensor) -> Tensor:
        y = self.output(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        how = "" if self.rounding == "nearest" else f" ({self.rounding})"
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, int8{how}"


class Base8bit:
    """:class:`lorakit.quant.QuantizedBase` over an :class:`Int8Linear` (both matmuls in int8, fp32 out).

    It goes into the weight slot of lorakit's LoRA ops like a 4-bit base, so q/k/v and the
    SwiGLU MLP of an int8 model run fused (:mod:`lorakit.fusion`); q/k/v (and gate/up)
    then quantize their one input once (:func:`int8_matmul`'s ``reuse``).

    Attributes:
        module: The ``Int8Linear``.
    """

    compute_dtype = torch.float32

    def __init__(self, module: Int8Linear) -> None:
        self.module = module
        self.in_features, self.out_features = module.in_features, module.out_features

    @property
    def bias(self) -> Tensor | None:
        return self.module.bias

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        return self.module.dequantized(dtype)

    def output(self, x2: Tensor, cd: torch.dtype) -> Tensor:
        return self.module.output(x2).to(cd)

    def grad_input(self, dy: Tensor, cd: torch.dtype) -> Tensor:
        return self.module.grad_input(dy).to(cd)


@functools.cache
def measured_speedup(dtype: torch.dtype = torch.float32, rows: int = 512, k: int = 576, m: int = 1536) -> float:
    """Time of an int8 base's two matmuls over ``dtype``'s, measured here (median of 7, once per process).

    One Linear ``[m, k]`` (default: the default model's MLP), ``rows`` rows: forward
    ``x Wᵀ`` plus input gradient ``dY W``, each with its per-row quantization; about 20 ms.

    Args:
        dtype: The float dtype to compare with (fp32 or bf16).
        rows, k, m: The shape.

    Returns:
        ``t_int8 / t_dtype`` (below 1: int8 is faster); ``nan`` without int8 kernels.
    """
    if int8_support() is not None:
        return float("nan")
    import time

    gen = torch.Generator().manual_seed(0)
    x, dy = torch.randn(rows, k, generator=gen), torch.randn(rows, m, generator=gen)
    layer = Int8Linear(*quantize_weight_int8(torch.randn(m, k, generator=gen)), None)
    W, xf, dyf = layer.dequantized(dtype), x.to(dtype), dy.to(dtype)

    def median(fn) -> float:
        times = []
        for i in range(9):
            t = time.perf_counter()
            fn()
            if i >= 2:
                times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    t_float = median(lambda: (xf @ W.t(), dyf @ W))
    t_int8 = median(lambda: (layer.output(x), layer.grad_input(dy)))
    return t_int8 / t_float
