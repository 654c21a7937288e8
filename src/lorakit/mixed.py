"""Mixed-adapter batches: each row of one batch runs its own adapter, grouped per adapter.

Inside ``with lorakit.adapter_batch(model, ["a", "b", "__base__", "a"]):`` every LoRA
layer computes::

    y = base(x)                                   # one matmul for the whole batch   (B, ..., out)
    for each adapter n in the batch:              # a loop over adapters, never over rows
        rows = the rows that run n                # gathered once per layer: x[rows] (Bₙ, ..., in)
        y[rows] += sₙ · Bₙ(Aₙ(dropout(x[rows])))  # index_add: autograd sees exactly these rows

or, for inference calls of few tokens (decoding steps, short prompts; ``_STACK_MAX_TOKENS``),
all adapters at once as one ``bmm`` pair over stacked copies of their weights, each row with its
own adapter (:mod:`lorakit.adapter_stacks`; the stacks cached per layer, rebuilt when the adapters
or their weights change, ``forget_stacks`` frees them). A batch with every row on one adapter takes
the single-adapter inference kernels instead (``x·Aᵀ``, one ``addmm`` into the base output). Either
way row ``i`` gets exactly what running it alone with its adapter gives, adapters of different ranks
share a batch, and in training each adapter's gradient is the one from its own rows (the other rows
never touch its weights). A layer's decoding route is decided at its first step in a block and kept for
the block's next steps; a server enters one block per step, so a block with the previous block's row names
takes those decisions over, each checked once against the layer (same adapters, weights, scalings).
``"__base__"`` rows (and rows of an adapter a layer does not have) get the base output. ``modules_to_save`` copies are
routed per row the same way (``index_copy`` of each copy's rows).

The route is a :mod:`lorakit.routing` override on each LoRA layer, owned by
``lorakit.mixed`` for the duration of the ``with`` block; fused SwiGLU MLPs
(:func:`lorakit.fusion.fuse_swiglu_mlps`) are unfused inside it and fused again on
exit, because their single-adapter op cannot split rows. Rows are the first dimension
of every adapted layer's input (``(batch, seq, features)``), which holds for
transformers' decoder models, with or without a KV cache, left padding included.

In training, make the adapters trainable first (``lorakit.set_adapter(model, names)``);
outside the block the model composes the active adapters as usual.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import adapter_stacks, few_rows, fusion, routing
from .adapter_stacks import RowPlan, Stack, plan_rows, stack_for
from .adapters import get_configs
from .errors import AdapterNotFoundError, ConfigError
from .layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSaveWrapper

__all__ = ["BASE", "AdapterRows", "adapter_batch", "forget_stacks"]

BASE = "__base__"  # the row runs no adapter
_OWNER = "lorakit.mixed"
_SHORTCUT_OWNER = "lorakit.layers"  # the merged-layer shortcut (see lorakit.routing); steps aside here
_FUSION_OWNER = "lorakit.fusion"
_ALLOWED_OWNERS = {None, _SHORTCUT_OWNER, _FUSION_OWNER, few_rows.OWNER}  # routes adapter_batch works with
# Calls of at most this many tokens (rows x positions) with several adapters take the stacked (bmm) path. Measured
# (SmolLM2-135M, 8 adapters r=16, 8 rows, 2 EPYC cores): a 128-token prefill +14 ms over a single adapter's
# (~500 ms), a decoding step +10 ms (~125 ms). The bmm does only each row's own adapter, as the gathered path
# does; past this size the gathered path (no padding rows) is kept, as before (the limit was set for the
# earlier masked stack, 0.95x the gathered path's time at 512 tokens, and not re-measured for bmm).
_STACK_MAX_TOKENS = 512
# model -> the AdapterRows of its last block: a block with the same row names (a server's next decoding step) takes
# its layers' decoding records over, checked once per layer, instead of deciding every layer's route again.
_PREVIOUS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class AdapterRows:
    """Which rows of a batch run which adapter, as index tensors built once per batch.

    Attributes:
        names: one adapter name per row (``"__base__"`` for none).
        groups: ``(adapter name, row indices or None)`` per adapter in the batch, in order of
            first appearance; None when the adapter has every row (no gather needed).
    """

    def __init__(self, names: Sequence[str], device: torch.device) -> None:
        self.names = list(names)
        self.device = device
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            rows.setdefault(name, []).append(i)
        self._plans: dict[nn.Module, tuple[Stack, RowPlan]] = {}  # stacked path: each layer's plan for these rows
        self._layouts: dict[tuple, tuple] = {}  # stack's adapter names -> row layout, shared by layers
        # Decoding steps after a layer's first in this block: (x's numel, stack or None, plan or the one
        # adapter's name, base weight, bias, the base's linear function, the layer's adapter names).
        self._steps: dict[nn.Module, tuple[int, Stack | None, Any, Any, Any, Any, tuple[str, ...]]] = {}
        self._resumable: dict[nn.Module, tuple] = {}  # the previous block's _steps, when it had these names
        self.groups: list[tuple[str, torch.Tensor | None]] = [
            (name, None if len(idx) == len(self.names) else torch.tensor(idx, device=device))
            for name, idx in rows.items()
            if name != BASE
        ]

    def __len__(self) -> int:
        return len(self.names)

    def _check_rows(self, x: torch.Tensor, module: nn.Module) -> None:
        if x.dim() == 0 or x.shape[0] != len(self.names):
            raise ConfigError(
                f"adapter_batch was given {len(self.names)} adapter name(s), one per row, but a "
                f"{type(module).__name__} received input of shape {tuple(x.shape)}: its first dimension must be "
                f"the batch. Pass one name per row of the batch."
            )

    def lora_forward(self, layer: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """A LoRA layer's output with each row's adapter: the base once, each adapter on its rows."""
        step = self._steps.get(layer)
        if step is None and self._resumable:
            step = self._resume(layer)
        if (
            step is not None
            and x.numel() == step[0]
            and x.shape[0] == len(self.names)
            and not (args or kwargs or layer.disabled or layer.training or torch.is_grad_enabled())
            and (step[1] is None or step[1].unchanged())
        ):
            return self._step(layer, x, *step[1:6])
        self._check_rows(x, layer)
        y = layer.base_layer(x, *args, **kwargs)  # (B, ..., out)
        if layer.disabled:
            return y
        inplace = not torch.is_grad_enabled()
        r = layer.r
        present = [(name, idx) for name, idx in self.groups if name in r]
        if (
            inplace
            and present
            and isinstance(layer, LoraLinear)
            and not (layer.training and any(isinstance(layer.lora_dropout[n], nn.Dropout) for n, _ in present))
        ):
            if len(present) == 1 and present[0][1] is None:
                out = self._one(layer, x, y, present[0][0])
                if out is not None:
                    return out
            elif len(present) > 1 and x.numel() <= _STACK_MAX_TOKENS * x.shape[-1]:
                return self._stacked(layer, x, y, [n for n, _ in present])
        for name, idx in present:
            xs = x if idx is None else x.index_select(0, idx)  # (Bₙ, ..., in)
            d = _lora_delta(layer, name, xs).to(y.dtype)  # (Bₙ, ..., out)
            if idx is None:
                y = y.add_(d) if inplace else y + d
            else:
                y = y.index_add_(0, idx, d) if inplace else y.index_add(0, idx, d)
        return y

    def _one(self, layer: LoraLinear, x: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor | None:
        """Every row on adapter ``name``: the single-adapter inference kernels, ``y += s·(x·Aᵀ)·Bᵀ`` in place.

        Returns None (the caller takes the general route) where those kernels do not apply: mixed dtypes,
        autocast, a quantized base's output layout.
        """
        A = layer.lora_A[name].weight  # (r, in)
        if not (
            x.dtype == A.dtype == y.dtype
            and y.is_contiguous()
            and getattr(layer, "quantized", None) is None
            and not torch.is_autocast_enabled(x.device.type)
        ):
            return None
        if x.numel() == len(self.names) * x.shape[-1]:  # one token per row: the next steps take _step
            self._record(layer, x, None, name)
        xa = F.linear(x, A)  # (B, ..., r)
        y.view(-1, y.shape[-1]).addmm_(
            xa.view(-1, xa.shape[-1]), layer.lora_B[name].weight.T, alpha=layer.scaling[name]
        )
        return y

    def _stacked(self, layer: LoraLinear, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Few tokens (decoding): every adapter's LoRA as one ``bmm`` pair, each row with its own adapter."""
        stack = stack_for(layer, names)
        entry = self._plans.get(layer)
        if entry is None or entry[0] is not stack:  # once per layer per batch, and when the stack is rebuilt
            entry = self._plans[layer] = (stack, plan_rows(stack, self.names, self._layouts))
        plan = entry[1]
        if x.numel() == len(self.names) * x.shape[-1] and y.dtype == stack.dtype and y.is_contiguous():
            self._record(layer, x, stack, plan)  # one token per row (a decoding step): the next steps take _step
        return plan.add_to(y, x, stack.dtype)

    def _record(self, layer: LoraLinear, x: torch.Tensor, stack: Stack | None, plan: Any) -> None:
        """Keep what a decoding step of ``layer`` needs, decided once: the stack and plan, the base's weights and
        whether its few rows take :func:`lorakit.few_rows.linear` (then rechecked per call) or ``F.linear``."""
        base = layer.base_layer
        plain = type(base) is nn.Linear and not (base._forward_hooks or base._forward_pre_hooks)
        weight, bias = (base.weight, base.bias) if plain else (None, None)
        x2 = x.reshape(len(self.names), -1)
        routed = weight is not None and few_rows.takes_route(x2, weight, bias)
        linear = few_rows.linear if routed else F.linear
        self._steps[layer] = (x.numel(), stack, plan, weight, bias, linear, tuple(layer.r))

    def _resume(self, layer: LoraLayer) -> tuple | None:
        """The previous block's record of ``layer`` (same row names) if it still holds: same adapters on the layer,
        same base parameters, the stack still the layer's current one and fresh; else None (decided anew)."""
        step = self._resumable.pop(layer, None)
        if step is None or tuple(layer.r) != step[6]:
            return None
        stack, plan, weight, bias = step[1:5]
        if weight is not None:
            base = layer._modules["base_layer"]
            params = base._parameters
            if params.get("weight") is not weight or params.get("bias") is not bias:
                return None
            if base._forward_hooks or base._forward_pre_hooks:
                return None
        if stack is not None and not (adapter_stacks.STACKS.get(layer) is stack and stack.fresh(layer)):
            return None
        if stack is None and weight is not None:  # the one adapter's weights are read live: still the base's dtype?
            mods = layer._modules
            dtypes = {mods[k]._modules[plan]._parameters["weight"].dtype for k in ("lora_A", "lora_B")}
            if dtypes != {weight.dtype}:
                return None
        self._steps[layer] = step
        return step

    def _step(
        self,
        layer: LoraLinear,
        x: torch.Tensor,
        stack: Stack | None,
        plan: Any,
        weight: Any,
        bias: Any,
        linear: Any = F.linear,
    ) -> torch.Tensor:
        """A decoding step with nothing left to decide: the base, then the LoRA kernels, as few Python steps.

        ``plan`` is the stacked path's :class:`RowPlan`, or (``stack`` None) the name of the one adapter every
        row runs, whose weights are read from the layer on each step. ``linear`` computes the base from
        ``weight`` (``F.linear``, or :func:`lorakit.few_rows.linear` where its route applies).
        """
        x2 = x.reshape(len(self.names), -1)  # (B, in)
        y = linear(x2, weight, bias) if weight is not None else layer.base_layer(x2)  # (B, out)
        if stack is None:
            mods = layer._modules
            A = mods["lora_A"]._modules[plan]._parameters["weight"]
            B = mods["lora_B"]._modules[plan]._parameters["weight"]
            y.addmm_(F.linear(x2, A), B.T, alpha=layer.scaling[plan])
        else:
            plan.add_to(y, x2, stack.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    def saved_forward(self, wrapper: ModulesToSaveWrapper, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """A ``modules_to_save`` wrapper's output: each row from its adapter's copy (the original for others)."""
        self._check_rows(x, wrapper)
        y = wrapper.original_module(x, *args, **kwargs)
        if wrapper.disabled:
            return y
        for name, idx in self.groups:
            if name not in wrapper.modules_to_save:
                continue
            copy_ = wrapper.modules_to_save[name]
            if idx is None:
                y = copy_(x, *args, **kwargs)
            else:
                y = y.index_copy(0, idx, copy_(x.index_select(0, idx), *args, **kwargs).to(y.dtype))
        return y


def _lora_delta(layer: LoraLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    """``scaling · B(A(dropout(x)))`` of one adapter on the rows ``x``, in the adapter's dtype."""
    if isinstance(layer, LoraEmbedding):
        A, B = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
        base = layer.base_layer
        after_a = F.embedding(
            x, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )  # (Bₙ, ..., r)
        return (after_a @ B.T) * layer.scaling[name]
    A, B = layer.lora_A[name], layer.lora_B[name]  # nn.Linear (r, in) / (out, r), or convolutions
    return B(A(layer.lora_dropout[name](x).to(A.weight.dtype))) * layer.scaling[name]


# module-level functions bound with functools.partial: routing overrides must pickle
def _route_lora(rows: AdapterRows, layer: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return rows.lora_forward(layer, x, *args, **kwargs)


def _route_saved(rows: AdapterRows, wrapper: ModulesToSaveWrapper, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    return rows.saved_forward(wrapper, x, *args, **kwargs)


def _modules(model: nn.Module) -> list[nn.Module]:
    """``model.modules()`` without the LoRA layers' adapter containers (``lora_A`` ...: 3 + 3·n modules per layer,
    nothing there to route or check), which made most of ``adapter_batch``'s entry cost (a server enters it every
    decoding step)."""
    seen: set[int] = set()
    out: list[nn.Module] = []
    todo = [model]
    while todo:
        module = todo.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        out.append(module)
        children = module._modules
        if isinstance(module, LoraLayer):
            todo.append(children["base_layer"])
        else:
            todo.extend(m for m in reversed(children.values()) if m is not None)
    return out


def forget_stacks(model: nn.Module) -> None:
    """Drop the cached adapter stacks of ``model``'s layers and its last ``adapter_batch`` block's decoding records
    (after unloading adapters: frees their copies). See :func:`lorakit.adapter_stacks.forget_stacks`.

    Args:
        model: a model with LoRA layers.
    """
    _PREVIOUS.pop(model, None)
    adapter_stacks.forget_stacks(model)


def _check_names(model: nn.Module, names: list[str]) -> None:
    have = list(get_configs(model))
    if not names:
        raise ConfigError("adapter_names is empty; give one adapter name per row of the batch.")
    unknown = sorted({n for n in names if n != BASE and n not in have}, key=names.index)
    if unknown:
        raise AdapterNotFoundError(
            f"no adapter named {', '.join(map(repr, unknown))} on this model; adapters: {', '.join(have) or 'none'} "
            f"(or {BASE!r} for a row without adapter)."
        )


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[AdapterRows]:
    """Context manager: row ``i`` of every batch run inside it uses adapter ``adapter_names[i]``.

    The base matmul of each layer runs once for the whole batch and each adapter's LoRA
    matmuls once on its own rows (see the module docstring). Works under ``model.generate``
    (the batch keeps its rows; KV cache and left padding included) and in training
    (each adapter's gradient comes from its rows alone). The model is back as it was on exit,
    also when the body raises.

    Args:
        model: a model with adapters (unmerged).
        adapter_names: one adapter name per row; ``"__base__"`` for a row without adapter.

    Yields:
        The :class:`AdapterRows` in use.

    Raises:
        AdapterNotFoundError: a name is not on the model.
        ConfigError: no names, merged adapters, a model already inside ``adapter_batch``, or
            modules whose forward another part of lorakit has replaced (e.g. CUDA-graph replay).
    """
    names = list(adapter_names)
    _check_names(model, names)
    modules = _modules(model)
    layers = [m for m in modules if isinstance(m, LoraLayer)]
    wrappers = [m for m in modules if isinstance(m, ModulesToSaveWrapper)]
    merged = [layer for layer in layers if layer.merged_adapters]
    if merged:
        raise ConfigError(
            f"adapter_batch needs unmerged adapters, but {merged[0].merged_adapters} are merged into "
            f"the base weights; call lorakit.unmerge(model) (or lorakit.for_training) first."
        )
    routes = {m: owner for m in modules if (owner := routing.forward_owner(m)) is not None}
    owners = set(routes.values()) - _ALLOWED_OWNERS
    if owners:
        raise ConfigError(
            f"adapter_batch cannot route this model: {', '.join(sorted(map(str, owners)))} replaced "
            f"module forwards (nested adapter_batch, CUDA-graph replay); undo that first."
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    rows = AdapterRows(names, device)
    previous = _PREVIOUS.pop(model, None)
    if previous is not None and previous.names == rows.names and previous.device == device:
        rows._resumable = previous._steps
    was_fused = _FUSION_OWNER in routes.values()
    if was_fused:
        fusion.unfuse_mlps(model)
    routed: list[nn.Module] = []
    head_routed = False
    try:
        head_routed = few_rows.route_head(model)  # decoding steps: the head's few rows as (W·xᵀ)ᵀ
        for layer in layers:
            routing.remove_forward(layer, _SHORTCUT_OWNER)
            routing.set_forward(layer, functools.partial(_route_lora, rows, layer), _OWNER)
            routed.append(layer)
        for wrapper in wrappers:
            routing.set_forward(wrapper, functools.partial(_route_saved, rows, wrapper), _OWNER)
            routed.append(wrapper)
        yield rows
        if rows._steps:
            _PREVIOUS[model] = rows
    finally:
        rows._resumable = {}
        for module in routed:
            routing.remove_forward(module, _OWNER)
        if head_routed:
            few_rows.unroute_head(model)
        if was_fused:
            fusion.fuse_swiglu_mlps(model)
