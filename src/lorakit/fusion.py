"""Training-time routing: LoRA layers that read the same input run as one fused op.

Two patterns, each undone exactly by its ``unfuse_*`` function and checked again
at every call: whenever the layers involved do not run exactly one common,
unmerged adapter with one dropout ``p`` (several adapters, merged, disabled),
the call takes the per-module path and gives the same result.

* :func:`fuse_swiglu_mlps`: a Llama-style MLP ``down(silu(gate(x)) * up(x))``
  with LoRA on all three runs as :func:`lorakit.swiglu.lora_swiglu_mlp` (activation
  recomputed in backward; gate and up share one down-projection of ``x``).
* :func:`fuse_shared_inputs`: sibling projections that read one tensor
  (``q_proj``/``k_proj``/``v_proj`` and kin) run as one
  :func:`lorakit.ops.lora_linear_multi`: one down-projection matmul
  ``drop(x)·[A_q; A_k; A_v]ᵀ``, ``x`` saved once, one ``grad_x`` buffer, one
  matmul for every ``grad A``.

The shared-input fusion needs no change to the model's attention code. The
first member of a group (``q_proj``), called in training with autograd on,
computes every member's output, returns its own and keeps the others in a
one-shot stash tied to that exact input object; a sibling called with the same
object (``x is stashed``, not modified in place since) takes its output from the
stash. A sibling called with anything else drops the stash and computes alone:
that is cross-attention, where ``k``/``v`` read the encoder states, and the
group stops fusing from the next forward on (calling :func:`fuse_shared_inputs`
again re-arms it). Inference (``eval()`` or ``torch.no_grad()``) is untouched.

Quantized bases (4-bit bitsandbytes, int8) fuse like full-precision ones: the
fused ops take a :class:`lorakit.quant.QuantizedBase` in the weight slot and
dequantize it per matmul, so a QLoRA model saves ``x`` once per q/k/v group and
two ``[tokens, intermediate]`` tensors per MLP, as a full-precision one does.

Dropout: a fused group draws one mask on ``x`` for all its members (so do gate
and up in the fused MLP); PEFT draws one per module. Each member's update sees
the same dropout distribution, only the masks are shared, and a run with
``lora_dropout = 0`` is unaffected.

Gradient checkpointing: the recompute calls ``q``, ``k``, ``v`` again on the
recomputed input, so the stash works there too, and the recompute fuses exactly
when the original forward did (a group that stops fusing does so only at a call
outside backward), as non-reentrant checkpointing requires.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from . import ops, routing, swiglu
from .layers import LoraLinear
from .rerun import output_unread

__all__ = ["SHARED_INPUT_NAMES", "fuse_swiglu_mlps", "unfuse_mlps", "fuse_shared_inputs", "unfuse_shared_inputs"]

# Child names of projections that read one input, in call order (the first leads its group).
SHARED_INPUT_NAMES = (
    ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen, Gemma, Phi-3 (self_attn), BART, Whisper
    ("query", "key", "value"),  # BERT, RoBERTa, ViT
    ("q", "k", "v"),  # T5
    ("gate_proj", "up_proj"),  # gated MLPs that fuse_swiglu_mlps does not route (GELU, no LoRA on down)
)

_ROUTE_OWNER = __name__  # lorakit.routing owner tag of the fused-MLP forward


def _dropout_p(layer: LoraLinear, name: str) -> float:
    drop = layer.lora_dropout[name]
    return drop.p if isinstance(drop, nn.Dropout) else 0.0


def _spec(layer: LoraLinear, name: str) -> ops.LoraSpec:
    return ops.LoraSpec(
        layer.frozen_base(), layer.bias, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
    )


# ------------------------------------------------------------------------- SwiGLU MLPs


def _is_silu(act: Any) -> bool:
    if isinstance(act, nn.SiLU):
        return True
    return type(act).__name__ == "SiLUActivation"  # transformers' ACT2FN["silu"]


def _swiglu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` through swiglu.lora_swiglu_mlp when all three share one pending adapter."""
    layers = (self.gate_proj, self.up_proj, self.down_proj)
    pending = [layer._pending() for layer in layers]
    if all(p == pending[0] for p in pending) and len(pending[0]) == 1:
        name = pending[0][0]
        drops = {_dropout_p(layer, name) for layer in layers}
        if len(drops) == 1:
            return swiglu.lora_swiglu_mlp(
                x,
                *(_spec(layer, name) for layer in layers),
                dropout_p=drops.pop(),
                training=self.training,
                compute_output=not output_unread(self),
            )
    return type(self).forward(self, x)  # anything else: the model's own forward


def fuse_swiglu_mlps(model: nn.Module) -> int:
    """Route Llama-style MLPs (``down(silu(gate(x)) * up(x))``) with LoRA on all three through one fused op.

    The fused op saves ``g`` and ``u`` and recomputes the activation in
    backward (two ``[tokens, intermediate]`` tensors per layer fewer than
    stock autograd) and shares one down-projection of ``x`` between gate and
    up. At call time it falls back to the module's own forward whenever the
    three layers do not run exactly one common adapter with one dropout
    (merged, disabled, several adapters). With dropout, gate and up share one
    mask (PEFT draws one per module). Undo with :func:`unfuse_mlps`. The
    route is a :mod:`lorakit.routing` override; MLPs already routed by an
    earlier call are left as they are (and not counted).

    Args:
        model: an injected model.

    Returns:
        The number of MLP modules newly routed.

    Raises:
        ForwardConflictError: an MLP's forward was already replaced by someone else.
    """
    count = 0
    for module in model.modules():
        parts = [getattr(module, k, None) for k in ("gate_proj", "up_proj", "down_proj")]
        if (
            all(isinstance(p, LoraLinear) and not p.fan_in_fan_out for p in parts)
            and _is_silu(getattr(module, "act_fn", None))
            and routing.forward_owner(module) != _ROUTE_OWNER
        ):
            # a partial of a module-level function pickles (torch.save of the model)
            routing.set_forward(module, functools.partial(_swiglu_forward, module), _ROUTE_OWNER)
            count += 1
    return count


def unfuse_mlps(model: nn.Module) -> None:
    """Give every MLP routed by :func:`fuse_swiglu_mlps` its own forward back."""
    for module in model.modules():
        routing.remove_forward(module, _ROUTE_OWNER)


# ---------------------------------------------------------------- shared-input groups


class _SharedInput:
    """Sibling LoraLinears that read one input; ``members[0]`` leads.

    Each member holds the group in its ``shared_input`` attribute: a plain
    attribute, so no submodule and no state-dict entry. Copies and pickles of
    the group (``copy.deepcopy``, ``torch.save`` of the model) leave the stash out.
    """

    def __init__(self, members: tuple[LoraLinear, ...]) -> None:
        self.members = members
        self.x: torch.Tensor | None = None  # the input object the stashed outputs belong to
        self.x_version = 0  # its version counter then: an in-place change in between voids the stash
        self.stash: dict[LoraLinear, torch.Tensor] = {}  # sibling -> its output, taken once
        self.missed = False  # a sibling read another input than the leader (cross-attention)
        self.off = False  # ... so the group no longer fuses

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "x": None, "stash": {}}

    def output(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s output from the group's fused op, or None: then ``layer`` computes it alone."""
        if layer is not self.members[0]:
            if self.x is None:
                return None
            if x is self.x and (torch.compiler.is_compiling() or x._version == self.x_version):
                out = self.stash.pop(layer, None)
                if not self.stash:
                    self.x = None
                return out
            self.x, self.stash, self.missed = None, {}, True
            return None
        self.x, self.stash = None, {}  # a new leader call: anything left over is stale
        if self.missed and torch._C._current_graph_task_id() == -1:  # not in a backward's recompute
            self.off = True
        if self.off or not layer.training or not torch.is_grad_enabled():
            return None
        pending = layer._pending()
        if len(pending) != 1 or any(m._pending() != pending or m.training != layer.training for m in self.members[1:]):
            return None
        name = pending[0]
        drops = {_dropout_p(m, name) for m in self.members}
        if len(drops) != 1:
            return None
        outs = ops.lora_linear_multi(
            x, [_spec(m, name) for m in self.members], dropout_p=drops.pop(), training=layer.training
        )
        self.x, self.x_version = x, (0 if torch.compiler.is_compiling() else x._version)
        self.stash = dict(zip(self.members[1:], outs[1:]))
        return outs[0]


def fuse_shared_inputs(model: nn.Module) -> int:
    """Run sibling LoRA projections that read one input (q/k/v) as one fused op in training.

    In every module, the LoRA-wrapped children named as in
    :data:`SHARED_INPUT_NAMES` (``q_proj``/``k_proj``/``v_proj`` and kin; two
    or more of them, with equal ``in_features``, not ``fan_in_fan_out``) form a
    group. In training with autograd on, the group's first call computes all
    its outputs with one :func:`lorakit.ops.lora_linear_multi` and the siblings
    take theirs from a one-shot stash tied to the input object (see the module
    docstring for the fallbacks, dropout and gradient checkpointing). The
    state dict does not change. Calling it again replaces the groups (and
    re-arms groups that stopped fusing); undo with :func:`unfuse_shared_inputs`.

    Args:
        model: an injected model.

    Returns:
        The number of groups formed.
    """
    unfuse_shared_inputs(model)
    count = 0
    for module in model.modules():
        children = module._modules
        for names in SHARED_INPUT_NAMES:
            members = tuple(children[n] for n in names if isinstance(children.get(n), LoraLinear))
            if len(members) < 2 or any(m.fan_in_fan_out for m in members) or len({m.in_features for m in members}) != 1:
                continue
            group = _SharedInput(members)
            for m in members:
                m.shared_input = group
            count += 1
    return count


def unfuse_shared_inputs(model: nn.Module) -> None:
    """Dissolve every group formed by :func:`fuse_shared_inputs`: each layer runs on its own again."""
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.__dict__.pop("shared_input", None)
