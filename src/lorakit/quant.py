"""Quantized frozen bases: 4-bit (bitsandbytes NF4 / FP4) storage and the LoRA op over it.

QLoRA (Dettmers et al. 2023) keeps the base weights in 4 bits and trains LoRA on
top. The storage is bitsandbytes' own (``bnb.nn.Linear4bit`` holding a
``Params4bit``: two 4-bit codes per byte, one absmax per 64 weights, the absmaxes
themselves 8-bit with double quantization), so a base quantized here is the one
PEFT + bitsandbytes users get, and their adapters and ours load on either.

What the LoRA layers need from a quantized base is one narrow interface,
:class:`QuantizedBase` (defined with the math, :mod:`lorakit.branches`, and
re-exported here):

* ``output(x2, cd)``: ``x2 Wᵀ`` for ``x2 [N, in]``, in the compute dtype ``cd``;
* ``grad_input(dy, cd)``: ``dY W`` for ``dy [N, out]``;
* ``dequantized(dtype)``: ``W [out, in]`` itself (merging, tests);
* ``shape``, ``in_features``, ``out_features``, ``bias``, ``compute_dtype``.

:class:`Base4bit` implements it by dequantizing one layer's weight with
bitsandbytes' ``dequantize_4bit`` straight into ``cd``, using it and dropping
it: the full-precision weight exists only for the length of one matmul, and
backward dequantizes again instead of saving it. Another storage (int8,
:class:`lorakit.int8.Base8bit`) plugs in by implementing the same interface and
being returned by :func:`quantized_base`.

A quantized base goes into the weight slot of lorakit's LoRA ops
(:func:`lorakit.ops.lora_linear`, :func:`lorakit.ops.lora_linear_multi`,
:func:`lorakit.swiglu.lora_swiglu_mlp`): the same autograd functions, so the
fusions of :mod:`lorakit.fusion` (q/k/v as one op, the SwiGLU MLP with its
activation recomputed) apply to 4-bit and int8 models as they are.
:func:`lora_linear_quantized` is the one-layer op with bitsandbytes' output
dtype rule.
:mod:`lorakit.quant_model` turns a loaded model's Linear layers into such
bases (``lorakit.quantize``).

bitsandbytes is optional: ``pip install bitsandbytes==0.50.2`` (or ``pip install
'lorakit[qlora]'``); it is imported only when a 4-bit base is made or used.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .branches import QuantizedBase
from .errors import ConfigError, ModelLoadError, ModelMismatchError
from .ops import lora_linear

__all__ = [
    "QUANTIZATIONS",
    "COMPUTE_DTYPES",
    "INSTALL_HINT",
    "QuantizedBase",
    "Base4bit",
    "require_bitsandbytes",
    "check_quantization",
    "resolve_compute_dtype",
    "quantized_base",
    "dequantize_4bit",
    "dequantize_packed",
    "quantize_weight_4bit",
    "lora_linear_quantized",
]

QUANTIZATIONS = ("nf4", "fp4")
COMPUTE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INSTALL_HINT = "pip install bitsandbytes==0.50.2"
BLOCKSIZE = 64  # bitsandbytes' and transformers' default 4-bit block (weights per absmax)

_CPUINFO = Path("/proc/cpuinfo")


# ----------------------------------------------------------------------------- bitsandbytes and settings


def require_bitsandbytes() -> Any:
    """Import bitsandbytes, or say how to install it.

    Returns:
        The ``bitsandbytes`` module.

    Raises:
        ModelLoadError: bitsandbytes is not installed (the message names the install command).
    """
    if sys.modules.get("bitsandbytes") is not None:
        return sys.modules["bitsandbytes"]
    log = logging.getLogger("bitsandbytes")
    level = log.level
    # Its CPU backend warns at import that an optional kernel package (`kernels`) is missing; the
    # plain kernels it falls back to are the ones lorakit calls, so the warning only adds noise.
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as e:
        raise ModelLoadError(
            f"4-bit bases need bitsandbytes, which is not installed ({e}); run `{INSTALL_HINT}` "
            "(or `pip install 'lorakit[qlora]'`), or set quantization: none."
        ) from None
    finally:
        log.setLevel(level)
    return bitsandbytes


def check_quantization(quantization: str) -> str:
    """Validate a quantization name.

    Args:
        quantization: ``"nf4"`` or ``"fp4"`` (any case).

    Returns:
        The name, lower case.

    Raises:
        ConfigError: any other value.
    """
    q = str(quantization).lower()
    if q not in QUANTIZATIONS:
        raise ConfigError(
            f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)} "
            "(or none for a full-precision base)."
        )
    return q


def _cpu_bf16_flag() -> str | None:
    try:
        flags = set(_CPUINFO.read_text().split())
    except OSError:
        return None
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)


def resolve_compute_dtype(
    requested: str | torch.dtype, device: torch.device | str | None = None, precision: str | None = None
) -> tuple[torch.dtype, str]:
    """The dtype a 4-bit base is dequantized into and multiplied in.

    ``auto`` follows ``train.precision``: the resolved ``precision`` when one is
    given (a training run), else the same hardware rule (bf16 on a CUDA GPU with
    bf16, and on CPUs with AMX or AVX512-BF16; fp32 elsewhere).

    Args:
        requested: ``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"`` or a torch dtype of those.
        device: Where the model computes (default CPU).
        precision: A resolved ``train.precision`` (``"fp32"`` / ``"bf16"``), or None.

    Returns:
        ``(dtype, reason)``.

    Raises:
        ConfigError: an unknown compute dtype.
    """
    if isinstance(requested, torch.dtype):
        names = {v: k for k, v in COMPUTE_DTYPES.items()}
        if requested not in names:
            raise ConfigError(f"unknown compute_dtype {requested}; use auto, {', '.join(COMPUTE_DTYPES)}.")
        return requested, f"compute_dtype is {names[requested]}"
    key = str(requested).lower()
    if key in COMPUTE_DTYPES:
        return COMPUTE_DTYPES[key], f"compute_dtype is {key}"
    if key != "auto":
        raise ConfigError(f"unknown compute_dtype {requested!r}; use auto, {', '.join(COMPUTE_DTYPES)}.")
    if precision is not None:
        return COMPUTE_DTYPES[precision], f"auto: follows train.precision ({precision})"
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return (torch.bfloat16, "auto: the GPU supports bf16") if ok else (torch.float32, "auto: the GPU has no bf16")
    flag = _cpu_bf16_flag() if dev.type == "cpu" else None
    if flag is not None:
        return torch.bfloat16, f"auto: the CPU has {flag}"
    return torch.float32, f"auto: no fast bf16 on this {dev.type} (no AMX/AVX512-BF16)"


# ----------------------------------------------------------------------------- dequantization


def _plain_state(weight: Any) -> Any:
    """The weight's quant state in bitsandbytes' standard layout.

    bitsandbytes' ``Linear4bit.forward`` repacks its weight for an inference-only CPU
    kernel the first time it runs in eval mode without grad on an AVX512-BF16 CPU;
    that layout is undone here (bitsandbytes' own inverse) before anything reads it.
    """
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        weight.quant_state = state
    return state


def dequantize_packed(packed: Tensor, state: Any, dtype: torch.dtype) -> Tensor:
    """``W`` from bitsandbytes' packed 4-bit codes and quant state, dequantized straight into ``dtype``.

    Args:
        packed: The uint8 codes (two per byte), as :func:`quantize_weight_4bit` returns them.
        state: Their ``bitsandbytes.functional.QuantState`` (standard layout).
        dtype: fp32, bf16 or fp16.

    Returns:
        A new tensor of ``state.shape`` (``[out, in]``).
    """
    bnb = require_bitsandbytes()
    target = bnb.functional.QuantState(  # the same state, asking for another output dtype
        absmax=state.absmax,
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=dtype,
        offset=state.offset,
        state2=state.state2,
    )
    return bnb.functional.dequantize_4bit(packed, target)


def dequantize_4bit(weight: Any, dtype: torch.dtype) -> Tensor:
    """``W [out, in]`` of a ``Params4bit``, dequantized by bitsandbytes straight into ``dtype``.

    Args:
        weight: A quantized ``bitsandbytes.nn.Params4bit``.
        dtype: fp32, bf16 or fp16.

    Returns:
        A new tensor ``[out, in]`` (the caller owns it; nothing keeps a reference).
    """
    state = _plain_state(weight)
    return dequantize_packed(weight.data, state, dtype)


def quantize_weight_4bit(weight: Tensor, quantization: str = "nf4", double_quant: bool = True) -> tuple[Tensor, Any]:
    """Quantize one ``[out, in]`` weight as bitsandbytes (and so transformers) does.

    Args:
        weight: The full-precision weight (fp64 is quantized from its fp32 values).
        quantization: ``"nf4"`` or ``"fp4"``.
        double_quant: Also quantize the absmaxes (8-bit, blocks of 256).

    Returns:
        ``(packed uint8 codes, QuantState)``.

    Raises:
        ConfigError: an unknown quantization.
    """
    bnb = require_bitsandbytes()
    q = check_quantization(quantization)
    w = weight.detach()
    if w.dtype not in COMPUTE_DTYPES.values():
        w = w.float()
    return bnb.functional.quantize_4bit(
        w.contiguous(), blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type=q
    )


class Base4bit:
    """:class:`QuantizedBase` over a ``bitsandbytes.nn.Linear4bit``: dequantize per call, then matmul.

    Attributes:
        module: The ``Linear4bit``.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.in_features, self.out_features = module.in_features, module.out_features

    @property
    def bias(self) -> Tensor | None:
        return self.module.bias

    @property
    def compute_dtype(self) -> torch.dtype | None:
        return getattr(self.module, "compute_dtype", None)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def quantization(self) -> str:
        return self.module.weight.quant_type

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        return dequantize_4bit(self.module.weight, dtype)

    def output(self, x2: Tensor, cd: torch.dtype) -> Tensor:
        W = dequantize_4bit(self.module.weight, cd)  # [out, in], alive for this matmul only
        return x2 @ W.t()  # [N, out]

    def grad_input(self, dy: Tensor, cd: torch.dtype) -> Tensor:
        W = dequantize_4bit(self.module.weight, cd)  # dequantized again: never saved from forward
        return dy @ W  # [N, in]


def quantized_base(module: nn.Module) -> QuantizedBase | None:
    """The :class:`QuantizedBase` of a quantized Linear, None for any other module.

    Args:
        module: A module, typically a LoRA layer's ``base_layer``.

    Returns:
        A :class:`Base4bit` for a ``bitsandbytes.nn.Linear4bit``; what a module's own
        ``as_quantized_base()`` returns (:class:`lorakit.int8.Int8Linear`); else None.
    """
    own = getattr(module, "as_quantized_base", None)  # another storage says itself what it is (int8)
    if callable(own):
        return own()
    bnb = sys.modules.get("bitsandbytes")  # not imported: no module can be a bitsandbytes layer
    if bnb is not None and isinstance(module, bnb.nn.Linear4bit):
        # bitsandbytes' CPU inference path repacks the weight in place (absmax rounded to bf16);
        # lorakit's bases keep bitsandbytes' standard layout, the one PEFT and save_pretrained use.
        module.support_avx512bf16_for_cpu = False
        return Base4bit(module)
    return None


# ----------------------------------------------------------------------------- the LoRA op


def lora_linear_quantized(
    x: Tensor,
    base: QuantizedBase,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    dropout_mask: Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    compute_output: bool = True,
) -> Tensor:
    """One adapted Linear over a quantized frozen base, as one autograd op (:func:`lorakit.ops.lora_linear`).

    Forward dequantizes the base weight into the compute dtype, multiplies and
    frees it; backward dequantizes it again for ``grad_x``. Saved: ``x`` (compute
    dtype), ``drop(x) Aᵀ`` ``[N, r]``, a dropout seed; never the weight. The base
    bias (if any) gets a gradient when it requires one.

    Args:
        x: Input ``[..., in]``.
        base: The frozen base (:func:`quantized_base`).
        lora_A: ``[r, in]``, fp32 master.
        lora_B: ``[out, r]``, fp32 master.
        scaling: ``lora_alpha / r`` (or ``/ sqrt(r)`` for rsLoRA).
        dropout_p: Dropout on the LoRA branch's input, in ``[0, 1)``.
        training: Dropout applies only when True.
        dropout_mask: Optional explicit multiplier of ``x``'s shape (tests).
        compute_dtype: Matmul dtype; None means the base layer's compute dtype, else the
            autocast dtype when autocast is on, else ``x.dtype``.
        compute_output: False skips the output matmuls (a checkpointing rerun).

    Returns:
        ``[..., out]`` in ``x.dtype`` (as bitsandbytes' ``Linear4bit`` returns it), under
        autocast at least fp32; base output and LoRA term are summed there.

    Raises:
        ConfigError: ``dropout_p`` outside ``[0, 1)``.
        ModelMismatchError: the LoRA factors or ``x`` do not fit the base.
    """
    n_in, n_out = base.in_features, base.out_features
    if x.shape[-1] != n_in or lora_A.shape[1] != n_in or lora_B.shape != (n_out, lora_A.shape[0]):
        raise ModelMismatchError(
            f"LoRA shapes do not fit the quantized base [{n_out}, {n_in}]: x [..., {x.shape[-1]}], "
            f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}; expected lora_A [r, {n_in}], "
            f"lora_B [{n_out}, r]"
        )
    return lora_linear(
        x, base, base.bias, lora_A, lora_B, scaling, dropout_p, training, dropout_mask, compute_dtype, compute_output
    )
