"""Gradient checkpointing that does not recompute what LoRA does not need.

Stock checkpointing keeps each decoder layer's input and reruns the whole layer
forward in backward. For a LoRA layer that rerun has one piece of dead work:
the MLP's output. In a Llama-style layer it only feeds the residual add, which
saves nothing for backward, and LoRA's backward of ``down_proj`` needs its input
``h`` and the r-wide ``h Aᵀ``, never its output. So the rerun skips the frozen
``[tokens, intermediate] x [intermediate, hidden]`` matmul (a quarter of the
layer's forward FLOPs in SmolLM2/Llama) and the LoRA up-projection; everything
else is recomputed as usual.

How: transformers' own per-layer checkpointing (non-reentrant
``torch.utils.checkpoint``) with a ``context_fn`` whose recompute context is
:func:`lorakit.rerun.rerun_mode`; this module marks the MLP (fused SwiGLU) and
its ``down_proj`` with :func:`lorakit.rerun.mark_output_unread`, and their
forwards ask :func:`lorakit.rerun.output_unread`.

The skip is applied only where the layout guarantees the output is unread: a
decoder layer whose children are exactly ``input_layernorm``, ``self_attn``,
``post_attention_layernorm`` and ``mlp`` (Llama, Mistral, Qwen2/3, Gemma, SmolLM),
and an MLP made of ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn``.
Other layers are checkpointed the stock way. A layout with a norm or dropout
after the MLP (Gemma 2/3's ``post_feedforward_layernorm``, Phi-3's residual
dropout) is excluded by that rule, since a norm there would save the output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from torch import nn

from .. import rerun
from ..errors import ConfigError
from ..layers import LoraLinear
from .graphs import decoder_layers

__all__ = ["enable_checkpointing", "disable_checkpointing", "LLAMA_LAYER", "LLAMA_MLP"]

LLAMA_LAYER = frozenset({"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"})
LLAMA_MLP = frozenset({"gate_proj", "up_proj", "down_proj", "act_fn"})


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for torch.utils.checkpoint: nothing in forward, recompute mode in the rerun."""
    return contextlib.nullcontext(), rerun.rerun_mode()


def _mark(layers: nn.ModuleList | None) -> int:
    """Flag the checkpointed layers' MLPs (and down_proj) whose output only feeds the residual add; count them."""
    count = 0
    for layer in layers if layers is not None else ():
        mlp = getattr(layer, "mlp", None)
        if not getattr(layer, "gradient_checkpointing", False):
            continue
        if {name for name, _ in layer.named_children()} != LLAMA_LAYER or mlp is None:
            continue
        if {name for name, _ in mlp.named_children()} != LLAMA_MLP:
            continue
        rerun.mark_output_unread(mlp)  # the fused SwiGLU path (lorakit.fusion)
        if isinstance(mlp.down_proj, LoraLinear):
            rerun.mark_output_unread(mlp.down_proj)  # the per-module path
        count += 1
    return count


def enable_checkpointing(model: nn.Module, say: Callable[[str], None] | None = None, every_n_layers: int = 1) -> int:
    """Turn on per-layer gradient checkpointing whose rerun skips the MLP output.

    Args:
        model: a transformers model with LoRA injected (and, usually, MLPs fused).
        say: optional progress printer; told how many layers are checkpointed and skip.
        every_n_layers: checkpoint every N-th decoder layer only (transformers'
            ``every_n_layers``); the others keep their activations. 1: every layer.

    Returns:
        The number of checkpointed decoder layers whose recompute skips the MLP output
        (0: stock checkpointing everywhere, still correct).

    Raises:
        ConfigError: ``every_n_layers`` below 1, or above 1 with a transformers that lacks it.
        ValueError: from transformers, when the model does not support checkpointing.
    """
    if every_n_layers < 1:
        raise ConfigError(f"every_n_layers must be at least 1, got {every_n_layers}")
    kwargs = {"use_reentrant": False, "context_fn": _contexts}  # non-reentrant: no enable_input_require_grads
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
    elif every_n_layers == 1:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ConfigError(
            "checkpointing every N-th layer needs transformers' activation_checkpointing_enable "
            "(transformers >= 5.2x); use gradient_checkpointing: true"
        )
    layers = decoder_layers(model)
    count = _mark(layers)
    if say is not None:
        total = len(layers) if layers is not None else 0
        done = sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers or ())
        say(
            f"gradient checkpointing: {done} of {total} decoder layers, {count} of them without rerunning "
            f"the MLP output"
        )
    return count


def disable_checkpointing(model: nn.Module) -> None:
    """Turn checkpointing off and drop the recompute marks."""
    rerun.unmark_all(model)
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
