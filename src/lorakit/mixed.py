"""Mixed-adapter batches: each row of one batch runs its own adapter, grouped per adapter.

Inside ``with lorakit.adapter_batch(model, ["a", "b", "__base__", "a"]):`` every LoRA
layer computes::

    y = base(x)                                   # one matmul for the whole batch   (B, ..., out)
    for each adapter n in the batch:              # a loop over adapters, never over rows
        rows = the rows that run n                # gathered once per layer: x[rows] (Bₙ, ..., in)
        y[rows] += sₙ · Bₙ(Aₙ(dropout(x[rows])))  # index_add: autograd sees exactly these rows

or, for inference calls of few tokens (decoding steps, short prompts; ``_STACK_MAX_TOKENS``),
all adapters at once as one batched matmul pair, with no loop::

    xₙ = x[rows of n]                             # (G, c, ..., in): c rows per adapter (none copied
                                                  #   when the rows already come in adapter order)
    y[rows of n] += sₙ · (xₙ · Aₙᵀ) · Bₙᵀ           # bmm over the stacked (G, in, r) and (G, r, out)

the stacks cached per layer (copies, rebuilt when the adapters or their weights change;
``forget_stacks`` frees them). A batch with every row on one adapter takes the single-adapter
inference kernels instead (base, ``x·Aᵀ``, one ``addmm``). Either way row ``i`` gets exactly what running it alone
with its adapter gives, adapters of different ranks share a batch, and in training each
adapter's gradient is the one from its own rows (the other rows never touch its weights).
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
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import fusion, routing
from .adapters import get_configs
from .errors import AdapterNotFoundError, ConfigError
from .inject import lora_layers
from .layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSaveWrapper

__all__ = ["BASE", "AdapterRows", "adapter_batch", "forget_stacks"]

BASE = "__base__"  # the row runs no adapter
_OWNER = "lorakit.mixed"
_SHORTCUT_OWNER = "lorakit.layers"  # the merged-layer shortcut (see lorakit.routing); steps aside here
_FUSION_OWNER = "lorakit.fusion"
# Calls of at most this many tokens (rows x positions) with several adapters take the stacked (bmm) path. Measured
# (SmolLM2-135M, 8 adapters r=16, 8 rows, 2 EPYC cores): a 128-token prefill +14 ms over a single adapter's
# (~500 ms), a decoding step +10 ms (~125 ms). The bmm does only each row's own adapter, as the gathered path
# does; past this size the gathered path (no padding rows) is kept, as before (the limit was set for the
# earlier masked stack, 0.95x the gathered path's time at 512 tokens, and not re-measured for bmm).
_STACK_MAX_TOKENS = 512
_STACK_SLACK = 2  # a cached stack serves a batch whose adapters hold at least 1/this of its rank (rows leaving)
_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> its _Stack


class AdapterRows:
    """Which rows of a batch run which adapter, as index tensors built once per batch.

    Attributes:
        names: one adapter name per row (``"__base__"`` for none).
        groups: ``(adapter name, row indices or None)`` per adapter in the batch, in order of
            first appearance; None when the adapter has every row (no gather needed).
    """

    def __init__(self, names: Sequence[str], device: torch.device) -> None:
        self.names = list(names)
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            rows.setdefault(name, []).append(i)
        self._plans: dict[nn.Module, tuple[_Stack, _Plan]] = {}  # stacked path: each layer's plan for these rows
        self._layouts: dict[tuple, tuple] = {}  # stack's adapter names -> row layout, shared by layers
        # Decoding steps after a layer's first in this block: (x's numel, stack or None, plan or the one
        # adapter's name, base weight, bias).
        self._steps: dict[nn.Module, tuple[int, _Stack | None, Any, Any, Any]] = {}
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
        if (
            step is not None
            and x.numel() == step[0]
            and x.shape[0] == len(self.names)
            and not (args or kwargs or layer.disabled or layer.training or torch.is_grad_enabled())
            and (step[1] is None or step[1].unchanged())
        ):
            return self._step(layer, x, *step[1:])
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
            base = layer.base_layer
            plain = type(base) is nn.Linear and not (base._forward_hooks or base._forward_pre_hooks)
            weight, bias = (base.weight, base.bias) if plain else (None, None)
            self._steps[layer] = (x.numel(), None, name, weight, bias)
        xa = F.linear(x, A)  # (B, ..., r)
        y.view(-1, y.shape[-1]).addmm_(
            xa.view(-1, xa.shape[-1]), layer.lora_B[name].weight.T, alpha=layer.scaling[name]
        )
        return y

    def _stacked(self, layer: LoraLinear, x: torch.Tensor, y: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Few tokens (decoding): every adapter's LoRA as one batched matmul pair, each adapter on its own rows.

        The rows are laid out as (adapters, c rows each) (see :class:`_Plan`); ``bmm`` with the stacked
        ``Aₙᵀ`` (G, in, r) and ``Bₙᵀ`` (G, r, out) then does exactly each row's own adapter: the same
        weight bytes as one matmul over every adapter's columns with a per-row mask, but not G times the
        arithmetic, which at decoding's few rows costs as much as the bytes (measured, 2-core EPYC,
        SmolLM2-135M, 8 rows on 8 adapters: +14 ms per step over the base's linears vs +31 ms masked).
        """
        stack = _stack_for(layer, names)
        entry = self._plans.get(layer)
        if entry is None or entry[0] is not stack:  # once per layer per batch, and when the stack is rebuilt
            entry = self._plans[layer] = (stack, self._plan(stack))
        plan = entry[1]
        if x.numel() == len(self.names) * x.shape[-1] and y.dtype == stack.dtype and y.is_contiguous():
            # one token per row (a decoding step): the next steps of this block take _step
            base = layer.base_layer
            plain = type(base) is nn.Linear and not (base._forward_hooks or base._forward_pre_hooks)
            weight, bias = (base.weight, base.bias) if plain else (None, None)
            self._steps[layer] = (x.numel(), stack, plan, weight, bias)
        return plan.add_to(y, x, stack.dtype)

    def _plan(self, stack: _Stack) -> _Plan:
        """The stack's slots these rows use (a contiguous range, so a view) and the rows' layout over them."""
        slot = {n: i for i, n in enumerate(stack.names)}
        key = tuple(stack.names)
        layout = self._layouts.get(key)
        if layout is None:
            per_slot: list[list[int]] = [[] for _ in stack.names]
            for i, name in enumerate(self.names):
                if name in slot:
                    per_slot[slot[name]].append(i)
            used = [k for k, rows in enumerate(per_slot) if rows]
            lo, hi = used[0], used[-1] + 1
            c = max(len(per_slot[k]) for k in used)
            # padding rows (an adapter with fewer rows, or none, in the range) read row 0 and are multiplied by 0
            gather = [rows[j] if j < len(rows) else 0 for rows in per_slot[lo:hi] for j in range(c)]
            keep = [float(j < len(rows)) for rows in per_slot[lo:hi] for j in range(c)]
            idx = None if gather == list(range(len(self.names))) else torch.tensor(gather, device=stack.device)
            pad = None if all(keep) else torch.tensor(keep, dtype=stack.dtype, device=stack.device)
            layout = self._layouts[key] = (lo, hi, c, idx, pad)
        lo, hi, c, idx, pad = layout
        return _Plan(stack.a[lo:hi], stack.b[lo:hi], c, idx, pad)

    def _step(
        self, layer: LoraLinear, x: torch.Tensor, stack: _Stack | None, plan: Any, weight: Any, bias: Any
    ) -> torch.Tensor:
        """A decoding step with nothing left to decide: the base, then the LoRA kernels, as few Python steps.

        ``plan`` is the stacked path's :class:`_Plan`, or (``stack`` None) the name of the one adapter every
        row runs, whose weights are read from the layer on each step.
        """
        x2 = x.reshape(len(self.names), -1)  # (B, in)
        y = F.linear(x2, weight, bias) if weight is not None else layer.base_layer(x2)  # (B, out)
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


class _Plan(NamedTuple):
    """How one batch's rows meet one layer's stack: G = slots ``lo..hi`` of it, ``c`` rows per slot.

    Row ``idx[g·c + j]`` is the ``j``-th row of slot ``g``; ``idx`` is None when that is simply row
    ``g·c + j`` (rows already in the stack's order: no gather, no scatter). A slot with fewer than ``c``
    rows (or none: an adapter of the range that this batch does not use) is padded with row 0, multiplied
    by 0 (``pad``), which adds exact zeros to row 0.
    """

    a: torch.Tensor  # (G, in, r) view of the stack, scalings folded in
    b: torch.Tensor  # (G, r, out)
    c: int
    idx: torch.Tensor | None  # (G·c,) row indices
    pad: torch.Tensor | None  # (G·c,) 1 for a row, 0 for padding; None without padding

    def add_to(self, y: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``y[row] += s·(x[row]·Aᵀ)·Bᵀ`` with each row's own adapter; ``y`` (B, ..., out) in place."""
        g, c, idx = len(self.a), self.c, self.idx
        xs = x.to(dtype) if idx is None else x.index_select(0, idx).to(dtype)  # (G·c, ..., in)
        xa = torch.bmm(xs.reshape(g, -1, xs.shape[-1]), self.a)  # (G, c·seq, r)
        if self.pad is not None:
            xa.view(g, c, -1, xa.shape[-1]).mul_(self.pad.view(g, c, 1, 1))
        if idx is None and y.dtype == dtype and y.is_contiguous():
            y.view(g, -1, y.shape[-1]).baddbmm_(xa, self.b)
            return y
        d = torch.bmm(xa, self.b).view(g * c, *y.shape[1:]).to(y.dtype)  # (G·c, ..., out)
        return y.add_(d) if idx is None else y.index_add_(0, idx, d)


class _Stack:
    """Some adapters of one LoRA Linear, stacked for ``bmm``: ``Aₙᵀ`` as (n, in, r) and ``Bₙᵀ`` as (n, r, out).

    Copies of the weights, made once and reused by every decoding step while they are fresh (same
    tensors, unchanged version counters, same scalings), each ``Aₙ`` times its scaling (no multiply per
    step). Adapters of a smaller rank are zero-padded to the largest (zero columns of A, zero rows of B:
    exact).
    """

    def __init__(self, layer: LoraLinear, names: list[str]) -> None:
        self.names = names
        a_mods, b_mods = layer.lora_A._modules, layer.lora_B._modules
        self.weights = [(a_mods[n].weight, b_mods[n].weight) for n in names]
        self.versions = [(_version(a), _version(b)) for a, b in self.weights]
        self.tracked = [t for pair in self.weights for t in pair if not t.is_inference()]  # may change in place
        self.tracked_versions = [t._version for t in self.tracked]
        self.scalings = [layer.scaling[n] for n in names]
        self.rank = sum(a.shape[0] for a, _ in self.weights)
        width = max(a.shape[0] for a, _ in self.weights)
        first_a, first_b = self.weights[0]
        self.a = first_a.new_zeros(len(names), first_a.shape[1], width)  # (n, in, r)
        self.b = first_b.new_zeros(len(names), width, first_b.shape[0])  # (n, r, out)
        for k, (a, b) in enumerate(self.weights):
            self.a[k, :, : a.shape[0]] = a.detach().T * self.scalings[k]
            self.b[k, : b.shape[1]] = b.detach().T
        self.dtype, self.device = self.a.dtype, self.a.device

    def serves(self, layer: LoraLinear, names: list[str]) -> bool:
        """Holds ``names``' current weights, without more than ``_STACK_SLACK`` times their rank."""
        r = layer.r
        if any(n not in self.names for n in names) or self.rank > _STACK_SLACK * sum(r[n] for n in names):
            return False
        mods, scaling = layer._modules, layer.scaling  # every decoding step, every layer: plain dict lookups
        a_mods, b_mods = mods["lora_A"]._modules, mods["lora_B"]._modules
        for n, (a, b), (va, vb), s in zip(self.names, self.weights, self.versions, self.scalings):
            ma, mb = a_mods.get(n), b_mods.get(n)
            if ma is None or mb is None or scaling.get(n) != s:
                return False
            if ma._parameters["weight"] is not a or mb._parameters["weight"] is not b:
                return False
            if _version(a) != va or _version(b) != vb:
                return False
        return True

    def unchanged(self) -> bool:
        """No in-place change to the stacked weights since the stack was made (an optimizer step)."""
        return [t._version for t in self.tracked] == self.tracked_versions


def _stack_for(layer: LoraLinear, names: list[str]) -> _Stack:
    """The layer's cached stack if it serves ``names``, else a new one of ``names`` in the layer's order.

    The layer's order makes the stack independent of row order; a stack of more adapters than the
    batch uses (requests that finished) serves on while within ``_STACK_SLACK``, so a server whose
    batch changes every step rebuilds only when a new adapter arrives.
    """
    stack = _STACKS.get(layer)
    if stack is not None and stack.serves(layer, names):
        return stack
    wanted = set(names)
    stack = _STACKS[layer] = _Stack(layer, [n for n in layer.r if n in wanted])
    return stack


def _version(t: torch.Tensor) -> int:
    """In-place changes seen so far (inference tensors cannot change in place: always 0)."""
    return 0 if t.is_inference() else t._version


def forget_stacks(model: nn.Module) -> None:
    """Drop the cached adapter stacks of ``model``'s layers (after unloading adapters: frees their copies)."""
    for _, layer in lora_layers(model):
        _STACKS.pop(layer, None)


# module-level functions bound with functools.partial: routing overrides must pickle
def _route_lora(rows: AdapterRows, layer: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return rows.lora_forward(layer, x, *args, **kwargs)


def _route_saved(rows: AdapterRows, wrapper: ModulesToSaveWrapper, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    return rows.saved_forward(wrapper, x, *args, **kwargs)


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
    modules = list(model.modules())
    layers = [m for m in modules if isinstance(m, LoraLayer)]
    wrappers = [m for m in modules if isinstance(m, ModulesToSaveWrapper)]
    merged = [layer for layer in layers if layer.merged_adapters]
    if merged:
        raise ConfigError(
            f"adapter_batch needs unmerged adapters, but {merged[0].merged_adapters} are merged into "
            f"the base weights; call lorakit.unmerge(model) (or lorakit.for_training) first."
        )
    routes = {m: owner for m in modules if (owner := routing.forward_owner(m)) is not None}
    owners = set(routes.values()) - {None, _SHORTCUT_OWNER, _FUSION_OWNER}
    if owners:
        raise ConfigError(
            f"adapter_batch cannot route this model: {', '.join(sorted(map(str, owners)))} replaced "
            f"module forwards (nested adapter_batch, CUDA-graph replay); undo that first."
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    rows = AdapterRows(names, device)
    was_fused = _FUSION_OWNER in routes.values()
    if was_fused:
        fusion.unfuse_mlps(model)
    routed: list[nn.Module] = []
    try:
        for layer in layers:
            routing.remove_forward(layer, _SHORTCUT_OWNER)
            routing.set_forward(layer, functools.partial(_route_lora, rows, layer), _OWNER)
            routed.append(layer)
        for wrapper in wrappers:
            routing.set_forward(wrapper, functools.partial(_route_saved, rows, wrapper), _OWNER)
            routed.append(wrapper)
        yield rows
    finally:
        for module in routed:
            routing.remove_forward(module, _OWNER)
        if was_fused:
            fusion.fuse_swiglu_mlps(model)
