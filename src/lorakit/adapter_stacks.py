"""Several adapters of one LoRA Linear stacked for batched matmuls: how mixed-adapter batches decode.

:mod:`lorakit.mixed` runs batches whose rows use different adapters. For calls of few tokens
(decoding steps, short prompts) it computes every row's own adapter at once, two ``bmm`` over
the adapters' stacked weights::

    x_g = x[rows of adapter g]                    # (G, c·seq, in): c rows per adapter, padded
    y[rows of g] += (x_g · (s_g·A_g)ᵀ) · B_gᵀ     # stacks (G, in, r) and (G, r, out)

Each row reads only its adapter's columns: the same weight bytes as one matmul over every
adapter's columns with a per-row mask, without G times the arithmetic, which at decoding's few
rows costs as much as the bytes (2-core EPYC, SmolLM2-135M, 8 rows on 8 adapters: +14 ms per step
over the base's linears, vs +31 ms masked and +8 ms for one adapter).

:class:`Stack` holds the copies, cached per layer by :func:`stack_for` and rebuilt when the
adapters or their weights change (:func:`forget_stacks` frees them); :func:`plan_rows` lays a
batch's rows out over a stack as a :class:`RowPlan`, which adds the LoRA terms in place.
"""

from __future__ import annotations

import operator
import weakref
from typing import NamedTuple

import torch
from torch import nn

from .inject import lora_layers
from .layers import LoraLinear

__all__ = ["SLACK", "STACKS", "RowPlan", "Stack", "forget_stacks", "plan_rows", "stack_for"]

SLACK = 2  # a cached stack serves a batch whose adapters hold at least 1/this of its rank (rows leaving)
STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> its Stack
_VERSION = operator.attrgetter("_version")
_WEIGHT = operator.itemgetter("weight")


class RowPlan(NamedTuple):
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
        """``y[row] += s·(x[row]·Aᵀ)·Bᵀ`` with each row's own adapter, in place.

        Args:
            y: the base output (B, ..., out).
            x: the layer's input (B, ..., in).
            dtype: the stack's dtype (the LoRA matmuls run in it).

        Returns:
            ``y``.
        """
        a, b, c, idx, pad = self  # decoding runs this on every layer: locals, no attribute lookups
        g = a.shape[0]
        xs = x if idx is None else x.index_select(0, idx)  # (G·c, ..., in)
        if xs.dtype != dtype:
            xs = xs.to(dtype)
        xa = torch.bmm(xs.reshape(g, -1, xs.shape[-1]), a)  # (G, c·seq, r)
        if pad is not None:
            xa.view(g, c, -1, xa.shape[-1]).mul_(pad.view(g, c, 1, 1))
        if idx is None and y.dtype == dtype and y.is_contiguous():
            y.view(g, -1, y.shape[-1]).baddbmm_(xa, b)
            return y
        d = torch.bmm(xa, b).view(g * c, *y.shape[1:]).to(y.dtype)  # (G·c, ..., out)
        return y.add_(d) if idx is None else y.index_add_(0, idx, d)


class Stack:
    """Some adapters of one LoRA Linear, stacked for ``bmm``: ``Aₙᵀ`` as (n, in, r) and ``Bₙᵀ`` as (n, r, out).

    Copies of the weights, made once and reused by every decoding step while they are fresh (same
    tensors, unchanged version counters, same scalings), each ``Aₙ`` times its scaling (no multiply per
    step). Adapters of a smaller rank are zero-padded to the largest (zero columns of A, zero rows of B:
    exact).
    """

    def __init__(self, layer: LoraLinear, names: list[str]) -> None:
        self.names = names
        a_mods, b_mods = layer.lora_A._modules, layer.lora_B._modules
        self.modules = [*(a_mods[n] for n in names), *(b_mods[n] for n in names)]  # A modules, then B modules
        self.param_dicts = [m._parameters for m in self.modules]  # each module's own dict, never replaced by torch
        self.params = [d["weight"] for d in self.param_dicts]
        self.weights = list(zip(self.params[: len(names)], self.params[len(names) :]))
        self.tracked = [t for t in self.params if not t.is_inference()]  # may change in place
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
        """Whether this stack holds ``names``' current weights, without more than ``SLACK`` times their rank.

        Args:
            layer: the stack's layer.
            names: the adapters a batch runs on it.

        Returns:
            True if the stack can serve the batch as it is.
        """
        r = layer.r
        if any(n not in self.names for n in names) or self.rank > SLACK * sum(r[n] for n in names):
            return False
        return self.fresh(layer)

    def fresh(self, layer: LoraLinear) -> bool:
        """Whether the stacked adapters are still the layer's: same modules, weights and scalings, unchanged in place.

        Runs at the first call of every layer in every ``adapter_batch`` block (a server enters one per decoding
        step), so the comparisons are ``map`` over lists, no Python loop per adapter.

        Args:
            layer: the stack's layer.

        Returns:
            True if the stack's copies equal what the layer holds now.
        """
        mods = layer._modules
        a_mods, b_mods = mods["lora_A"]._modules, mods["lora_B"]._modules
        now = [*map(a_mods.get, self.names), *map(b_mods.get, self.names)]
        if not all(map(operator.is_, now, self.modules)):  # an adapter removed or replaced
            return False
        params = map(_WEIGHT, self.param_dicts)  # the same modules (checked above): their dicts, one hop less
        return (
            all(map(operator.is_, params, self.params))
            and list(map(layer.scaling.get, self.names)) == self.scalings
            and self.unchanged()
        )

    def unchanged(self) -> bool:
        """Whether the stacked weights are unchanged in place since the stack was made (no optimizer step).

        Returns:
            True if every tracked weight's version counter is the one seen when stacking.
        """
        return list(map(_VERSION, self.tracked)) == self.tracked_versions


def stack_for(layer: LoraLinear, names: list[str]) -> Stack:
    """The layer's cached stack if it serves ``names``, else a new one of ``names`` in the layer's order.

    The layer's order makes the stack independent of row order; a stack of more adapters than the
    batch uses (requests that finished) serves on while within ``SLACK``, so a server whose
    batch changes every step rebuilds only when a new adapter arrives.

    Args:
        layer: a LoRA Linear holding every adapter in ``names``.
        names: the adapters a batch runs on this layer (two or more).

    Returns:
        The :class:`Stack` (cached in :data:`STACKS`).
    """
    stack = STACKS.get(layer)
    if stack is not None and stack.serves(layer, names):
        return stack
    wanted = set(names)
    stack = STACKS[layer] = Stack(layer, [n for n in layer.r if n in wanted])
    return stack


def forget_stacks(model: nn.Module) -> None:
    """Drop the cached adapter stacks of ``model``'s layers (after unloading adapters: frees their copies).

    Args:
        model: a model with LoRA layers.
    """
    for _, layer in lora_layers(model):
        STACKS.pop(layer, None)


def plan_rows(stack: Stack, row_names: list[str], layouts: dict[tuple[str, ...], tuple]) -> RowPlan:
    """How a batch's rows meet ``stack``: the slots they use (a contiguous range, so a view) and their layout.

    Args:
        stack: one layer's stack.
        row_names: one adapter name per row; rows of adapters not in the stack get nothing.
        layouts: the batch's cache of layouts per stack's adapter names (layers with the same stack
            adapters share one, with its index tensors).

    Returns:
        The layer's :class:`RowPlan`.
    """
    key = tuple(stack.names)
    layout = layouts.get(key)
    if layout is None:
        slot = {n: i for i, n in enumerate(stack.names)}
        per_slot: list[list[int]] = [[] for _ in stack.names]
        for i, name in enumerate(row_names):
            if name in slot:
                per_slot[slot[name]].append(i)
        used = [k for k, rows in enumerate(per_slot) if rows]
        lo, hi = used[0], used[-1] + 1
        c = max(len(per_slot[k]) for k in used)
        # padding rows (an adapter with fewer rows, or none, in the range) read row 0 and are multiplied by 0
        gather = [rows[j] if j < len(rows) else 0 for rows in per_slot[lo:hi] for j in range(c)]
        keep = [float(j < len(rows)) for rows in per_slot[lo:hi] for j in range(c)]
        idx = None if gather == list(range(len(row_names))) else torch.tensor(gather, device=stack.device)
        pad = None if all(keep) else torch.tensor(keep, dtype=stack.dtype, device=stack.device)
        layout = layouts[key] = (lo, hi, c, idx, pad)
    lo, hi, c, idx, pad = layout
    return RowPlan(stack.a[lo:hi], stack.b[lo:hi], c, idx, pad)
