"""CUDA graphs for the decoder layers of a training step.

On a GPU, a LoRA step of a small model is bound by the CPU, not the GPU: for
SmolLM2-135M at 8 x 64 tokens the step launches ~6,700 kernels, the H100 is busy
for ~26 ms of it, and the rest of the ~200 ms is Python and kernel-launch
overhead (benchmarks/RESULTS.md). A CUDA graph records a layer's kernels once
and replays them with one launch, so :class:`LayerGraphs` records each decoder
layer's forward and backward (``torch.cuda.make_graphed_callables``, one shared
memory pool per input shape) and replays them; the embedding, the mask, the head,
the loss and the optimizer stay eager.

What a graph needs, and what happens otherwise (the layer just runs eagerly):

* the same input shape, dtype and mask layout as when it was recorded: one set of
  graphs per shape, each with its own memory pool, at most ``max_shapes`` and only
  while free GPU memory holds twice another one (then new shapes run eagerly), so
  the loop pads sequence lengths to coarse buckets when graphs are on;
* training mode with grad enabled, no KV cache, no gradient checkpointing;
* no randomness inside the layer: LoRA dropout would replay the same mask every
  step, so :func:`graph_blocker` refuses models with ``lora_dropout > 0``;
* autocast without its weight cache (``torch.autocast(..., cache_enabled=False)``);
* one step at a time: each graphed forward's backward runs before the next graphed
  forward of the same shape (a replay overwrites the activations the previous one
  saved). A training loop does this; two forwards then one backward would not.

Gradients: a graph writes its parameter gradients into static buffers that the
next replay overwrites. A hook on every trainable parameter copies the gradient
when ``param.grad`` is still None (autograd could otherwise keep the static buffer
itself as ``.grad``); with ``.grad`` allocated (``zero_grad(set_to_none=False)``)
autograd adds into it in place and the hook costs nothing.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .. import routing
from ..errors import ConfigError

__all__ = ["LayerGraphs", "decoder_layers", "graph_blocker", "setup_graphs"]

# Layer kwargs a graphed call may drop: sdpa/eager attention without a cache does not read them.
_IGNORED_KWARGS = {"position_ids", "cache_position", "use_cache", "past_key_values"}

_ROUTE_OWNER = __name__  # lorakit.routing owner tag of the patched decoder layers


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder layer list of a transformers causal LM (``model.model.layers`` and kin), or None."""
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if prefix else None
    layers = getattr(backbone, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        return layers
    return None


def graph_blocker(model: nn.Module, device: torch.device) -> str | None:
    """Why this model's layers cannot be CUDA-graphed on ``device``, or None when they can."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "CUDA graphs need a CUDA device"
    if decoder_layers(model) is None:
        return f"no decoder layer list found in {type(model).__name__} (expected model.<base>.layers)"
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attn not in (None, "sdpa", "eager"):
        return f"attention implementation {attn!r} (graphs are used with 'sdpa' and 'eager' only)"
    flag = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )  # transformers >= 5.2x renamed it
    if getattr(model, flag, False):
        return "gradient checkpointing is on (it recomputes layers outside the graph)"
    for name, module in model.named_modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict) and any(isinstance(d, nn.Dropout) and d.p > 0 for d in drops.values()):
            return f"LoRA dropout > 0 at {name} (a graph would replay the same dropout mask every step)"
    return None


def setup_graphs(model: nn.Module, mode: str, device: torch.device, say: Any = print) -> LayerGraphs | None:
    """``train.cuda_graphs``: attach :class:`LayerGraphs` when ``mode`` and the run allow it.

    Args:
        model: the injected model, in training mode.
        mode: ``"auto"`` (on when :func:`graph_blocker` finds nothing), ``"on"`` or ``"off"``.
        device: the training device.
        say: where the one-line decision (and later capture lines) go.

    Returns:
        The attached graphs, or None.

    Raises:
        ConfigError: ``mode == "on"`` but the run cannot use graphs (the reason is in the message).
    """
    if mode == "off":
        return None
    blocker = graph_blocker(model, device)
    if blocker is None:
        say("CUDA graphs: on (decoder layers recorded per padded shape, replayed each step)")
        return LayerGraphs(model, log=say)
    if mode == "on":
        raise ConfigError(f"train.cuda_graphs is on, but {blocker}; set it to auto or off")
    if device.type == "cuda":
        say(f"CUDA graphs: off ({blocker})")
    return None


class _LayerCall(nn.Module):
    """One decoder layer as a function of tensors only: ``(h, [mask], cos, sin) -> h``."""

    def __init__(self, layer: nn.Module, with_mask: bool) -> None:
        super().__init__()
        self.layer = layer
        self.with_mask = with_mask

    def forward(self, hidden: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        mask, cos, sin = rest if self.with_mask else (None, *rest)
        out = type(self.layer).forward(
            self.layer, hidden, attention_mask=mask, position_embeddings=(cos, sin), use_cache=False
        )
        if not isinstance(out, torch.Tensor):
            raise _NotGraphable(f"{type(self.layer).__name__} returns {type(out).__name__}, not a tensor")
        return out


class _NotGraphable(Exception):
    pass


class LayerGraphs:
    """Record and replay a causal LM's decoder layers as CUDA graphs while it trains.

    ``LayerGraphs(model)`` routes each decoder layer's ``forward`` to it (a
    :mod:`lorakit.routing` override: module names and state dicts are unchanged);
    :meth:`remove` restores them. Use it only when :func:`graph_blocker` returns None.

    Args:
        model: A transformers causal LM on a CUDA device, LoRA already injected.
        max_shapes: Most input shapes recorded; later new shapes run eagerly.
        log: Called with one line when a shape is recorded or graphs are given up.

    Raises:
        ValueError: the model has no decoder layer list.
        ForwardConflictError: a decoder layer's forward is already replaced (e.g. by
            another ``LayerGraphs`` that was not removed).
    """

    def __init__(self, model: nn.Module, max_shapes: int = 8, log: Any = None) -> None:
        layers = decoder_layers(model)
        if layers is None:
            raise ValueError(f"no decoder layer list found in {type(model).__name__}")
        self.layers = list(layers)
        self.max_shapes = max_shapes
        self.log = log or (lambda msg: None)
        self.graphs: OrderedDict[tuple, list[nn.Module]] = OrderedDict()
        self.disabled: str | None = None
        self.replays = 0
        self._current: list[nn.Module] | None = None
        self._full_warned = False
        self.bytes_per_token = 0.0  # pool growth per input token of the largest recording so far
        self.free_bytes = lambda device: torch.cuda.mem_get_info(device)[0]
        self._hooks = [
            p.register_hook(functools.partial(_own_grad, p))
            for layer in self.layers
            for p in layer.parameters()
            if p.requires_grad
        ]
        for i, layer in enumerate(self.layers):
            routing.set_forward(layer, functools.partial(self._forward, i), _ROUTE_OWNER)

    def remove(self) -> None:
        """Restore the layers' own forward and drop the recorded graphs."""
        for layer in self.layers:
            routing.remove_forward(layer, _ROUTE_OWNER)
        for h in self._hooks:
            h.remove()
        self._hooks, self.graphs, self._current = [], OrderedDict(), None

    # ----------------------------------------------------------------- forward

    def _forward(
        self,
        i: int,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> Any:
        layer = self.layers[i]
        args = self._graph_args(layer, hidden_states, attention_mask, position_embeddings, kwargs)
        if i == 0:  # the first layer picks (or records) the graphs the whole stack uses for this pass
            self._current = (
                None if args is None else self._graphs_for(hidden_states, attention_mask, position_embeddings)
            )
        call = self._current[i] if args is not None and self._current is not None else None
        if call is None or call.sample_requires_grad != hidden_states.requires_grad:
            return type(layer).forward(
                layer, hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings, **kwargs
            )
        self.replays += 1
        return call(*args)

    def _graph_args(self, layer, hidden, mask, pe, kwargs) -> tuple | None:
        """The graphed call's arguments, or None when this call must run eagerly."""
        if (
            self.disabled
            or not torch.is_grad_enabled()
            or not layer.training
            or not hidden.is_cuda
            or getattr(layer, "gradient_checkpointing", False)
            and layer.training
            or kwargs.get("past_key_values") is not None
            or kwargs.get("use_cache")
            or not set(kwargs) <= _IGNORED_KWARGS
            or not (isinstance(pe, tuple) and len(pe) == 2 and all(isinstance(t, torch.Tensor) for t in pe))
            or not (mask is None or isinstance(mask, torch.Tensor))
        ):
            return None
        if torch.is_autocast_enabled("cuda") and torch.is_autocast_cache_enabled():
            return None
        return (hidden, mask, *pe) if mask is not None else (hidden, *pe)

    # ----------------------------------------------------------------- capture

    def _key(self, hidden, mask, pe) -> tuple:
        meta = lambda t: (tuple(t.shape), t.dtype, tuple(t.stride()))  # noqa: E731
        return (
            meta(hidden),
            hidden.requires_grad,
            None if mask is None else meta(mask),
            meta(pe[0]),
            meta(pe[1]),
            torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda"),
        )

    def _graphs_for(self, hidden, mask, pe) -> list[nn.Module] | None:
        key = self._key(hidden, mask, pe)
        if key in self.graphs:
            return self.graphs[key]
        tokens = hidden.numel() // hidden.shape[-1]
        why_not = self._no_room(tokens, hidden.device)
        if why_not is not None:
            if not self._full_warned:
                self._full_warned = True
                self.log(f"CUDA graphs: {why_not}; new input shapes run eagerly")
            return None
        before = torch.cuda.memory_reserved(hidden.device)
        try:
            calls = self._capture(hidden, mask, pe)
        except _NotGraphable as e:
            self.disabled = str(e)
            self.log(f"CUDA graphs off: {e}")
            return None
        grown = torch.cuda.memory_reserved(hidden.device) - before
        self.bytes_per_token = max(self.bytes_per_token, grown / max(tokens, 1))
        self.graphs[key] = calls
        self.log(
            f"CUDA graphs: recorded {len(calls)} layers for input {tuple(hidden.shape)} ({grown / 2**20:,.0f} MiB)"
        )
        return calls

    def _no_room(self, tokens: int, device: torch.device) -> str | None:
        """Why a new shape must not be recorded (too many, or too little free GPU memory), or None.

        Each recorded shape keeps its own memory pool (about one step's activations), so
        before recording another the free memory must hold twice the estimate (bytes per
        token of the largest recording so far, times this shape's tokens).
        """
        if len(self.graphs) >= self.max_shapes:
            return f"{self.max_shapes} input shapes recorded (max_shapes)"
        if not self.graphs or self.bytes_per_token <= 0:
            return None
        need, free = self.bytes_per_token * tokens, self.free_bytes(device)
        if free < 2 * need:
            return (
                f"{len(self.graphs)} shapes recorded and {free / 2**30:.1f} GiB free, under twice the "
                f"~{need / 2**30:.2f} GiB another would hold"
            )
        return None

    def _capture(self, hidden, mask, pe) -> list[nn.Module]:
        requires_grad = hidden.requires_grad
        calls, samples = [], []
        for layer in self.layers:
            call = _LayerCall(layer, with_mask=mask is not None)
            call.sample_requires_grad = requires_grad
            x = torch.randn_like(hidden).requires_grad_(requires_grad)
            rest = tuple(t.detach().clone() for t in ((mask,) if mask is not None else ()) + tuple(pe))
            calls.append(call)
            samples.append((x, *rest))
            requires_grad = requires_grad or any(p.requires_grad for p in layer.parameters())
        # Outside the caller's autograd graph: warm-up and recording build their own.
        graphed = torch.cuda.make_graphed_callables(tuple(calls), tuple(samples), allow_unused_input=True)
        return list(graphed)


def _own_grad(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
    """Give ``param`` a gradient of its own instead of a graph's static buffer (see module doc)."""
    return grad.clone() if param.grad is None else None
