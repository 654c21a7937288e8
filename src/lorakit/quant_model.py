"""Quantize a loaded model for QLoRA: which Linear layers go 4-bit, and the state the rest is left in.

:func:`quantize` turns a model's Linear layers into bitsandbytes ``Linear4bit``
layers in place (the storage and the LoRA op over it are :mod:`lorakit.quant`'s).
It quantizes what transformers' ``BitsAndBytesConfig`` quantizes, to the same
bytes: every ``nn.Linear`` (and GPT-2 ``Conv1D``) except the output head, weights
tied to it and ``_keep_in_fp32_modules`` (:func:`modules_to_quantize`, which also
works on a ``meta``-device skeleton, as the streaming merge uses it). Then
:func:`prepare_quantized` leaves every other floating-point parameter (norms,
embeddings, head) in fp32 and everything frozen, as PEFT's
``prepare_model_for_kbit_training`` does. The model loader
(:func:`lorakit.models.load_model` with ``quantization=``) quantizes while loading
through transformers (:func:`lorakit.quant_load.load_4bit`) and then calls
:func:`prepare_quantized` too; :func:`release_checkpoint` (there and for int8
bases) copies what stays in full precision off the checkpoint file's memory map.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, UnsupportedModuleError
from .quant import COMPUTE_DTYPES, check_quantization, quantize_weight_4bit, require_bitsandbytes, resolve_compute_dtype

__all__ = [
    "quantize",
    "modules_to_quantize",
    "prepare_quantized",
    "release_checkpoint",
    "is_quantized_model",
    "quantization_info",
    "describe_quantization",
]


def is_quantized_model(model: nn.Module) -> bool:
    """Whether any module of ``model`` holds 4-bit (bitsandbytes) weights."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def quantization_info(model: nn.Module) -> dict[str, Any] | None:
    """How ``model``'s base is quantized, for run summaries and adapter notes.

    Returns:
        ``{"quantization", "double_quant", "compute_dtype", "layers"}`` read off the
        first 4-bit layer (and the count of them), or None for a model without any.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not layers:
        return None
    first = layers[0]
    names = {v: k for k, v in COMPUTE_DTYPES.items()}
    cd = getattr(first, "compute_dtype", None)
    return {
        "quantization": first.weight.quant_type,
        "double_quant": bool(first.weight.compress_statistics),
        "compute_dtype": names.get(cd, str(cd)),
        "layers": len(layers),
    }


def describe_quantization(model: nn.Module) -> str:
    """One line for run logs and summaries: ``"4-bit base: nf4, double quant, compute dtype bf16"``, or ``""``."""
    info = quantization_info(model)
    if info is None:
        return ""
    dq = ", double quant" if info["double_quant"] else ""
    return f"4-bit base: {info['quantization']}{dq}, compute dtype {info['compute_dtype']}"


# ----------------------------------------------------------------------------- quantizing a model


def _skip_names(model: nn.Module, skip_modules: Sequence[str] | None) -> list[str]:
    """Modules left in full precision: transformers' bitsandbytes rule plus the caller's."""
    names: set[str] = set(skip_modules or [])
    try:
        from transformers import PreTrainedModel
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        PreTrainedModel = None
    if PreTrainedModel is not None and isinstance(model, PreTrainedModel):
        names.update(get_keys_to_not_convert(model))  # output head, weights tied to it, the last module
        names.update(getattr(model, "_keep_in_fp32_modules", None) or [])
    else:
        get_out = getattr(model, "get_output_embeddings", None)
        head = get_out() if callable(get_out) else None
        names.update(n for n, m in model.named_modules() if head is not None and m is head)
    return sorted(names)


def _skipped(name: str, skip: Sequence[str]) -> bool:
    return any(name == s or name.endswith(f".{s}") or name.startswith(f"{s}.") or f".{s}." in name for s in skip)


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


def _quantizable(module: nn.Module) -> bool:
    return type(module) is nn.Linear or _is_conv1d(module)


def modules_to_quantize(model: nn.Module, skip_modules: Sequence[str] | None = None) -> list[str]:
    """Names of the modules :func:`quantize` turns into 4-bit layers (works on a ``meta``-device skeleton).

    Args:
        model: A model without LoRA layers.
        skip_modules: More module names (or name suffixes) to keep in full precision.

    Returns:
        Every ``nn.Linear`` (and GPT-2 ``Conv1D``) except the output head, weights tied
        to it, ``_keep_in_fp32_modules`` and ``skip_modules``, in model order.
    """
    skip = _skip_names(model, skip_modules)
    return [n for n, m in model.named_modules() if n and _quantizable(m) and not _skipped(n, skip)]


def _to_linear4bit(module: nn.Module, quantization: str, double_quant: bool, cd: torch.dtype) -> nn.Module:
    """A ``Linear4bit`` holding ``module``'s weight (``[out, in]``) in 4 bits, and its bias."""
    bnb = require_bitsandbytes()
    weight = module.weight.detach()
    if _is_conv1d(module):  # GPT-2's Conv1D stores (in, out)
        weight = weight.t()
    out_f, in_f = weight.shape
    with torch.device("meta"):
        new = bnb.nn.Linear4bit(
            in_f,
            out_f,
            bias=module.bias is not None,
            compute_dtype=cd,
            compress_statistics=double_quant,
            quant_type=quantization,
        )
    packed, state = quantize_weight_4bit(weight, quantization, double_quant)
    new.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=state.blocksize,
        compress_statistics=double_quant,
        quant_type=quantization,
        quant_storage=packed.dtype,
        module=new,
        bnb_quantized=True,
    )
    new.quant_state = state
    if module.bias is not None:
        new.bias = nn.Parameter(module.bias.detach().float(), requires_grad=False)
    new.compute_type_is_set = True
    new.support_avx512bf16_for_cpu = False  # see quantized_base
    return new


def release_checkpoint(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Copy the tensors left in full precision (embeddings, norms, biases, buffers) off the checkpoint file.

    transformers maps a safetensors checkpoint into memory and hands out views of the
    mapping: every page read once (all of them, once a quantizer has read every weight)
    stays in the process's resident set as long as any view of the file lives. Once the
    Linear layers are quantized, only the embeddings and norms still point into the file,
    yet they keep all of the fp32 weights resident (on the default model 0.49 GiB next to
    0.11 GiB of embeddings). Copied, the mapping closes and those pages leave. Quantized
    storage is the model's own already and is left as it is: 4-bit ``Params4bit`` weights,
    and the buffers of modules that are a quantized base themselves (``as_quantized_base``,
    :class:`lorakit.int8.Int8Linear`'s codes and scales).

    Args:
        model: The model, in place; a tensor shared by several modules (tied weights) stays shared.
        dtype: Floating-point parameters are converted to it (a copy either way); None keeps their dtypes.
    """
    for p in model.parameters():  # each Parameter once; .data keeps the Parameter object, so ties hold
        if type(p).__name__ == "Params4bit":
            continue
        convert = dtype is not None and p.is_floating_point() and p.dtype != dtype
        p.data = p.data.to(dtype) if convert else p.data.clone()
    copies: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if callable(getattr(module, "as_quantized_base", None)):
            continue
        for name, b in module.named_buffers(recurse=False):
            if b is not None:
                setattr(module, name, copies.setdefault(id(b), b.clone()))


def prepare_quantized(model: nn.Module, compute_dtype: torch.dtype, release: bool = True) -> nn.Module:
    """Put a 4-bit model in the state QLoRA trains in; used by :func:`quantize` and the model loader.

    Every parameter frozen; every floating-point parameter that is not 4-bit
    (norms, embeddings, output head, biases) in fp32, as PEFT's
    ``prepare_model_for_kbit_training`` does, and in memory of its own
    (:func:`release_checkpoint`: a tensor loaded from safetensors may be a view
    into the file's memory map, which keeps every page of the full-precision file
    resident). Each 4-bit layer's compute dtype set.

    Args:
        model: A model with ``bitsandbytes.nn.Linear4bit`` layers.
        compute_dtype: The dtype the 4-bit layers dequantize into.
        release: Copy the kept tensors off the checkpoint file; False when they are the
            model's own already (:func:`lorakit.quant_load.load_4bit`'s streamed load),
            where only parameters that are not fp32 are converted.

    Returns:
        ``model``, changed in place.
    """
    bnb = require_bitsandbytes()
    if release:
        release_checkpoint(model, torch.float32)
    for p in model.parameters():  # each once (tied weights are one Parameter)
        p.requires_grad_(False)
        if not release and type(p).__name__ != "Params4bit" and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype, m.compute_type_is_set = compute_dtype, True
            m.support_avx512bf16_for_cpu = False  # see quantized_base
    model.is_loaded_in_4bit = True  # what transformers sets, and PEFT reads
    return model


def quantize(
    model: nn.Module,
    quantization: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str | torch.dtype = "auto",
    skip_modules: Sequence[str] | None = None,
    modules: Sequence[str] | None = None,
) -> nn.Module:
    """Replace a loaded model's Linear layers by 4-bit bitsandbytes ones, in place (QLoRA's base).

    The packed weights equal what ``from_pretrained(..., quantization_config=
    BitsAndBytesConfig(load_in_4bit=True, ...))`` makes of the same weights, and the
    same modules stay in full precision: the output head (and weights tied to it),
    ``_keep_in_fp32_modules``, and ``skip_modules``. Each layer's full-precision
    weight is dropped as soon as it is quantized. Then :func:`prepare_quantized`.

    Args:
        model: A model without LoRA layers (quantize first, then inject).
        quantization: ``"nf4"`` (NormalFloat, QLoRA's) or ``"fp4"``.
        double_quant: Quantize the per-block absmaxes too (about 0.4 bit per weight saved).
        compute_dtype: ``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"`` (or a torch dtype);
            see :func:`resolve_compute_dtype`.
        skip_modules: More module names (or name suffixes) to keep in full precision.
        modules: Quantize exactly these modules (names or suffixes) instead of every Linear.

    Returns:
        ``model``.

    Raises:
        ModelLoadError: bitsandbytes is not installed.
        ConfigError: unknown quantization or compute dtype; a model that already has LoRA layers.
        UnsupportedModuleError: a module named in ``modules`` is not a Linear (or GPT-2 Conv1D).
    """
    q = check_quantization(quantization)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cd, _ = resolve_compute_dtype(compute_dtype, device)
    require_bitsandbytes()
    if any(".lora_" in n for n, _ in model.named_parameters()):
        raise ConfigError("the model already has LoRA layers; quantize the base first, then inject LoRA.")
    named = [(n, m) for n, m in model.named_modules() if n]
    if modules is not None:
        chosen = [(n, m) for n, m in named if any(n == s or n.endswith(f".{s}") for s in modules)]
        missing = [s for s in modules if not any(n == s or n.endswith(f".{s}") for n, _ in named)]
        if missing:
            raise ConfigError(f"modules to quantize not found in {type(model).__name__}: {', '.join(missing)}.")
        for n, m in chosen:
            if not _quantizable(m):
                raise UnsupportedModuleError(
                    f"cannot quantize {n} ({type(m).__module__}.{type(m).__name__}) to 4 bits: bitsandbytes' "
                    "4-bit storage holds nn.Linear (and GPT-2 Conv1D) weights; leave it out of the modules to "
                    "quantize (embeddings, norms and convolutions stay in full precision)."
                )
    else:
        wanted = set(modules_to_quantize(model, skip_modules))
        chosen = [(n, m) for n, m in named if n in wanted]
    if not chosen:
        raise UnsupportedModuleError(
            f"{type(model).__name__} has no nn.Linear layer to quantize (besides the output head); "
            "4-bit bases are for transformer models built from Linear layers."
        )
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _to_linear4bit(module, q, double_quant, cd))
        module.weight = None  # the full-precision copy goes now, not at the end
    return prepare_quantized(model, cd)
