"""Int8 bases at the model level: which Linear layers go int8, ``--quantize``, run-log lines.

:func:`quantize_int8` swaps a loaded model's Linear layers for
:class:`lorakit.int8.Int8Linear` (the same ones a 4-bit base quantizes: not the
output head, embeddings or norms, which stay fp32); the layer, its kernels and
the LoRA interface are :mod:`lorakit.int8`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import ConfigError, ModelLoadError
from .int8 import INT8_ALTERNATIVE, Int8Linear, require_int8

__all__ = [
    "QUANTIZE_CHOICES",
    "is_int8_model",
    "quantize_int8",
    "describe_int8",
    "check_int8_model_spec",
    "quantize_for_inference",
]

QUANTIZE_CHOICES = ("none", "int8")  # --quantize for generate / chat / eval


def is_int8_model(model: nn.Module) -> bool:
    """Whether any module of ``model`` is an :class:`Int8Linear`."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


def quantize_int8(model: nn.Module, skip_modules: Sequence[str] | None = None) -> nn.Module:
    """Replace a loaded model's Linear layers by :class:`Int8Linear` ones, in place.

    The same layers a 4-bit base quantizes (:func:`lorakit.quant_model.modules_to_quantize`):
    every ``nn.Linear`` (and GPT-2 ``Conv1D``) but the output head, weights tied to it and
    ``_keep_in_fp32_modules``; embeddings and norms stay as they are. Each full-precision
    weight is dropped as soon as its layer is quantized.

    Args:
        model: A model on the CPU, without LoRA layers (quantize first, then inject or load an adapter).
        skip_modules: More module names (or name suffixes) to keep in full precision.

    Returns:
        ``model``.

    Raises:
        ConfigError: no int8 kernel here (the message says what to use instead); a model not
            on the CPU; a model that already has LoRA layers.
    """
    from .quant_model import modules_to_quantize

    require_int8("int8 bases")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type != "cpu":
        raise ConfigError(
            f"int8 bases run on the CPU (oneDNN's int8 kernels); the model is on {device}. "
            f"Use {INT8_ALTERNATIVE} on {device.type}."
        )
    if any(".lora_" in n for n, _ in model.named_parameters()):
        raise ConfigError("the model already has LoRA layers; quantize the base to int8 first, then add LoRA.")
    names = modules_to_quantize(model, skip_modules)
    if not names:
        raise ModelLoadError(f"{type(model).__name__} has no nn.Linear layer to quantize to int8 (besides the head).")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        setattr(parent, child, Int8Linear.from_linear(old))
        old.weight = None  # the full-precision copy goes now, not at the end
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def describe_int8(model: nn.Module) -> str:
    """One line for run logs and summaries (``"int8 base: 14 Linear layers, ..."``), or ``""`` without any."""
    n = sum(isinstance(m, Int8Linear) for m in model.modules())
    if not n:
        return ""
    return f"int8 base: {n} Linear layers (int8 weights per output channel, int8 activations per row; head fp32)"


def check_int8_model_spec(model: object) -> None:
    """Refuse ``train.precision: int8`` on a 4-bit base (a run config's ``model`` value, before loading).

    Raises:
        ConfigError: ``model`` is a mapping with a ``quantization`` other than none.
    """
    q = model.get("quantization") if isinstance(model, dict) else None
    if q is not None and str(q).lower() != "none":
        raise ConfigError(
            f"train.precision: int8 quantizes a full-precision base to int8 itself, but model.quantization is {q!r} "
            "(a 4-bit base). Use one of them: model.quantization: none with precision int8, or a 4-bit base with "
            "precision fp32/bf16."
        )


def quantize_for_inference(model: nn.Module, quantize: str) -> nn.Module:
    """``--quantize`` of ``generate`` / ``chat`` / ``eval``: the loaded base's Linear layers to int8, in place.

    Decoding on a CPU is memory-bound: int8 weights move a quarter of fp32's bytes.
    Called before the adapter is loaded, so LoRA wraps the int8 layers and stays
    unmerged in fp32 on top.

    Args:
        model: The loaded base model (CPU, no LoRA yet).
        quantize: ``"none"`` or ``"int8"``.

    Returns:
        ``model``.

    Raises:
        ConfigError: an unknown value; a 4-bit base; no int8 kernels here or a model off the CPU.
    """
    q = str(quantize).lower()
    if q not in QUANTIZE_CHOICES:
        raise ConfigError(f"unknown --quantize {quantize!r}; use one of {', '.join(QUANTIZE_CHOICES)}.")
    if q == "none":
        return model
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        raise ConfigError("--quantize int8 needs a full-precision base, but this one is 4-bit; drop --quantize.")
    return quantize_int8(model)
