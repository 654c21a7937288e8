"""Decoding with a static KV cache, each step one CUDA graph replay on a GPU.

Batch-1 decoding on a GPU is bound by kernel launches, not by the GPU: every
decoding step of SmolLM2-135M launches hundreds of small kernels, and an unmerged
adapter adds three per adapted projection (measured on an H100: unmerged 1.77x the
plain model's time per token). A CUDA graph records one step's kernels once and
replays them with one launch, so an adapter's extra kernels cost GPU time only.

A graph replays the same kernels on the same memory, so the step has fixed shapes
and fixed addresses:

* the KV cache is transformers' ``StaticCache`` (one ``[B, heads, max_len, dim]``
  buffer per layer, written in place at the cache's own position counter, a device
  tensor the step advances);
* the step reads static buffers: the token ids ``[B, 1]``, the position ids ``[B, 1]``
  (left padding: each row counts only its real tokens, as ``model.generate`` does)
  and the cache slot; the attention mask ``[B, 1, 1, max_len]`` is built inside the
  step from the prompt's padding mask and the slot, so nothing is read back to the host;
* the adapters' route is whatever LoraLinear picks at capture (the active adapter,
  unmerged), except that while recording, unmerged projections run as Triton kernels
  (:mod:`lorakit.decode_lora`, :func:`fused_lora_terms`): q/k/v and gate/up each one
  kernel with their base matmuls (batch 1-16), o and down a base matmul plus one kernel
  for the LoRA term (batch 1-2 at r=16; beyond that torch's three ops per LoRA term). Mixed-adapter
  batches (``adapter_batch``) are refused.

:func:`static_decode` keeps its decoder per model (``reuse``) for the next call of the
same batch size and cache length: that call replays the recorded step, and the prefill
of a prompt width seen before (prompts left-padded to a multiple of ``PREFILL_BUCKET``)
is one graph replay too. A kept decoder is replaced when a weight moves or an adapter's
state or route changes.

Per token the host then copies the new tokens into the input buffer, replays, and
picks the next tokens (argmax, or a temperature sample) outside the graph; it reads
whether every row has stopped only every ``SYNC_EVERY`` steps on a GPU. On the CPU
(and on a GPU with ``graph="off"``) the same step runs eagerly: the same tokens, the
path the tests run without a GPU.

Capturable means: nothing in the step reads a tensor's value on the host (``.item()``,
``.tolist()``, ``bool(t)``, ``torch.nonzero``, boolean indexing, shapes from data). On
a GPU the warm-up runs under ``torch.cuda.set_sync_debug_mode("error")``, which names
such an op; on the CPU, :func:`fake_step` runs one step on fake tensors (shapes, no
values), where every such read raises.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import decode_lora, routing
from .errors import ConfigError
from .fusion import SHARED_INPUT_NAMES
from .layers import LoraLayer, LoraLinear, ModulesToSaveWrapper

__all__ = [
    "PREFILL_BUCKET",
    "REUSE_BUCKET",
    "SYNC_EVERY",
    "StaticDecoder",
    "capture_blocker",
    "fake_step",
    "forget",
    "fused_lora_terms",
    "static_decode",
]

SYNC_EVERY = 8  # on a GPU, read "every row stopped" back to the host once per this many steps
_WARMUP = 2  # eager steps on a side stream before capture (allocator, cuBLAS workspace, lazy inits)
_REFUSED_OWNERS = {"lorakit.mixed": "a mixed-adapter batch (adapter_batch) routes rows per block in Python"}
REUSE_BUCKET = 64  # static_decode(reuse=True): cache lengths rounded up to this, so calls of nearby lengths share
FUSE_BASE = ("off", "groups", "all")  # fused_lora_terms(fuse_base=): where the base matmul joins the LoRA kernel
PREFILL_BUCKET = 16  # a kept graphed decoder left-pads prompts to a multiple of this: one prefill graph per width
PREFILL_GRAPHS = 8  # prefill widths a decoder records at most (more run eagerly); they share one memory pool
_KEPT: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, StaticDecoder]] = weakref.WeakKeyDictionary()
_SAID: set[str] = set()  # why decode_lora could not run, as already told (fused_lora_terms)
_OWNER = "lorakit.graph_decode"  # routes unmerged LoRA Linears through decode_lora while a graph is recorded


def _kernel_operands(layer: LoraLinear, x: torch.Tensor) -> tuple[Any, ...] | None:
    """``(W, bias, A, B, scale)`` for decode_lora to run ``layer`` on ``x``, or None where it does not apply."""
    operands = layer.inference_operands(x)  # the layer's own rule for its inference path
    if operands is None:
        return None
    W, _, A, B, _ = operands
    if not (B.dtype == x.dtype and x.dtype in decode_lora.DTYPES and W.shape[1] == x.shape[-1]):
        return None
    return operands


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


class _Siblings:
    """Routed projections that read one input (q/k/v, gate/up): the first one's call runs all their LoRA terms.

    As :mod:`lorakit.fusion`'s training groups do: the leader computes every member's output
    and keeps the others' for the siblings' calls with the very same input object; a sibling
    called with another input (cross-attention) drops them and computes alone.
    """

    def __init__(self, members: tuple[LoraLinear, ...], fuse_base: bool = False) -> None:
        self.members, self.fuse_base = members, fuse_base
        self.x: torch.Tensor | None = None
        self.stash: dict[LoraLinear, torch.Tensor] = {}

    def output(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s output from the group's one kernel, or None: then ``layer`` computes it alone."""
        if layer is not self.members[0]:
            out = self.stash.pop(layer, None) if x is self.x else None
            if out is None or not self.stash:
                self.x, self.stash = None, {}
            return out
        self.x, self.stash = None, {}
        operands = [_kernel_operands(m, x) for m in self.members]
        if any(o is None for o in operands):
            return None
        ys = _project(x, operands, self.fuse_base)
        if ys is None:
            return None
        self.x, self.stash = x, dict(zip(self.members[1:], ys[1:]))
        return ys[0]


def _project(x: torch.Tensor, operands: Sequence[tuple[Any, ...]], fuse_base: bool) -> list[torch.Tensor] | None:
    """The outputs of projections reading ``x``, each ``(W, bias, A, B, scale)``, in decode_lora kernels, or
    None where they do not fit (:func:`~lorakit.decode_lora.fits`): with ``fuse_base`` the base matmuls in the
    kernel too (whole projections, where all or none have a bias), else cuBLAS's plus one LoRA kernel."""
    Ws, biases, As, Bs, scales = zip(*operands)
    whole = fuse_base and len({b is None for b in biases}) == 1
    if not decode_lora.fits(_rows(x), max(A.shape[0] for A in As), whole=whole):
        return None
    if whole:
        return decode_lora.linear_lora_group(x, Ws, biases, As, Bs, scales)
    ys = [F.linear(x, W, bias) for W, bias in zip(Ws, biases)]
    decode_lora.add_lora_group_(ys, x, As, Bs, scales)
    return ys


def _fused_lora_forward(
    layer: LoraLinear, group: _Siblings | None, fuse_base: bool, x: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """``layer``'s inference forward with its LoRA term as one kernel (decode_lora), where that applies;
    with ``fuse_base`` the base matmul in the same kernel."""
    if not args and not kwargs:
        if group is not None:
            y = group.output(layer, x)
            if y is not None:
                return y
        operands = _kernel_operands(layer, x)
        ys = _project(x, [operands], fuse_base) if operands is not None else None
        if ys is not None:
            return ys[0]
    return type(layer).forward(layer, x, *args, **kwargs)


@contextlib.contextmanager
def fused_lora_terms(
    model: nn.Module,
    device_types: Sequence[str] = ("cuda",),
    say: Any = None,
    group_siblings: bool = False,
    fuse_base: str = "off",
) -> Iterator[list[LoraLinear]]:
    """Within the block, ``model``'s unmerged LoRA Linears add their LoRA term with one kernel.

    Each unrouted :class:`~lorakit.layers.LoraLinear` whose base weight is on one of
    ``device_types`` runs ``F.linear(x, W, bias)`` plus :func:`lorakit.decode_lora.add_lora_` for
    calls that fit it (one active unmerged adapter, a plain base, few rows and, for the LoRA
    kernel alone, a small rank: :func:`~lorakit.decode_lora.fits`, no autograd, one dtype), or
    the whole projection in one kernel (``fuse_base``, below); other calls run the class's
    forward. :class:`StaticDecoder` records its graph inside this block. Nothing is routed where
    the kernel cannot run (:func:`~lorakit.decode_lora.available`: no Triton, or a GPU it cannot
    compile for); ``say`` is then told why.

    Args:
        model: The model.
        device_types: Where to route (the CPU runs the kernel only in Triton's interpreter).
        say: Called with one line when the kernel cannot run on a device the model is on.
        group_siblings: Also run the LoRA terms of projections that read one input
            (:data:`lorakit.fusion.SHARED_INPUT_NAMES`: q/k/v, gate/up) as one kernel per group
            (:func:`~lorakit.decode_lora.add_lora_group_`): 4 LoRA kernels a Llama layer instead of 7.
        fuse_base: Also run the base matmul in the LoRA term's kernel
            (:func:`~lorakit.decode_lora.linear_lora_group`): ``"groups"`` for the sibling groups,
            ``"all"`` for every routed projection, ``"off"`` for none.

    Yields:
        The routed layers (their routes are removed when the block ends).
    """
    if fuse_base not in FUSE_BASE:
        raise ConfigError(f"fuse_base must be one of {FUSE_BASE}, got {fuse_base!r}")
    refused: dict[torch.device, str | None] = {}

    def routable(module: nn.Module) -> bool:
        if not isinstance(module, LoraLinear) or routing.forward_owner(module) is not None:
            return False
        if module.quantized is not None:
            return False
        device = module.base_layer.weight.device
        if device.type not in device_types:
            return False
        if device not in refused:
            refused[device] = decode_lora.available(device)
            if refused[device] is not None and say is not None and refused[device] not in _SAID:
                _SAID.add(refused[device])  # once per process: decoding calls come in loops
                say(f"LoRA terms recorded as torch's ops: {refused[device]}")
        return refused[device] is None

    groups: dict[LoraLinear, _Siblings] = {}
    if group_siblings:
        for parent in model.modules():
            for names in SHARED_INPUT_NAMES:
                members = tuple(parent._modules[n] for n in names if routable(parent._modules.get(n)))
                if len(members) > 1 and len({m.in_features for m in members}) == 1:
                    group = _Siblings(members, fuse_base != "off")
                    groups.update(dict.fromkeys(members, group))
    routed = [module for module in model.modules() if routable(module)]
    for module in routed:
        forward = functools.partial(_fused_lora_forward, module, groups.get(module), fuse_base == "all")
        routing.set_forward(module, forward, _OWNER)
    try:
        yield routed
    finally:
        for module in routed:
            routing.remove_forward(module, _OWNER)


def capture_blocker(model: nn.Module) -> str | None:
    """Why :class:`StaticDecoder` cannot decode ``model`` at all, or None when it can.

    Args:
        model: A transformers causal LM, with or without lorakit adapters.

    Returns:
        The reason, or None.
    """
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if attn not in ("sdpa", "eager"):
        return f"attention implementation {attn!r} (static-cache decoding builds masks for 'sdpa' and 'eager' only)"
    for name, module in model.named_modules():
        owner = routing.forward_owner(module)
        if owner in _REFUSED_OWNERS:
            return f"{name} is routed by {owner}: {_REFUSED_OWNERS[owner]}"
    if model.training:
        return "the model is in training mode (dropout would differ per step); call model.eval() first"
    return None


class StaticDecoder:
    """One batch's static KV cache and its decoding step, recorded as a CUDA graph when asked.

    Use :meth:`prefill` once with the left-padded prompts, then :meth:`step` once per new
    token; both return the next-token logits ``[B, vocab]`` (float32; the buffer of a graphed
    step is overwritten by the next step, so use or copy it first).

    Args:
        model: A transformers causal LM (eval mode), adapters unmerged or not.
        max_len: Prompt width plus the most new tokens: the cache's length.
        graph: Record the step as a CUDA graph (CUDA only) on the first :meth:`step`.
        say: Called with one line if capture fails and the step runs eagerly instead.
        fuse_lora: Record each unmerged LoRA Linear's LoRA term as one Triton kernel
            (:mod:`lorakit.decode_lora`) instead of three torch ops where
            :func:`~lorakit.decode_lora.fits` (batch 1-2 at r=16; whole projections, ``fuse_base``,
            batch 1-16): fewer kernels per replay.
        group_siblings: With ``fuse_lora``, one kernel per group of projections reading one input
            (q/k/v, gate/up; :func:`fused_lora_terms`): 4 LoRA kernels a Llama layer instead of 7
            (an H200, batch 1, base matmuls apart: a replayed step 1.13x the plain model's, 1.22x ungrouped).
        prefill_bucket: Left-pad each prompt batch to a multiple of this width (padding is masked,
            so the tokens are the same): prompts of nearby widths then share one prefill shape.
        fuse_base: With ``fuse_lora``, the base matmul in the same kernel as the LoRA term
            (:func:`fused_lora_terms`): ``"groups"`` (q/k/v and gate/up each one kernel, whole),
            ``"all"`` (o and down too) or ``"off"``. On an H200 at batch 1 a replayed step is 1.05x
            the plain model's with ``"groups"``, 1.08x with ``"all"``, 1.13x with ``"off"``; at batch
            8 0.76x, 0.93x and 1.25x.
        graph_prefill: With ``graph``, record the prefill of a padded width as a CUDA graph the
            second time that width comes (the first prefill of a decoder is always eager: it lays
            out the cache), and replay it after: for a decoder kept across calls. At most
            :data:`PREFILL_GRAPHS` widths, their graphs sharing one memory pool.

    Raises:
        ConfigError: :func:`capture_blocker` names a reason, or ``graph`` off a CUDA device.
    """

    def __init__(
        self,
        model: nn.Module,
        max_len: int,
        graph: bool = False,
        say: Any = None,
        fuse_lora: bool = True,
        group_siblings: bool = True,
        prefill_bucket: int = 1,
        graph_prefill: bool = False,
        fuse_base: str = "groups",
    ) -> None:
        from transformers import StaticCache

        blocker = capture_blocker(model)
        if blocker is not None:
            raise ConfigError(f"static-cache decoding cannot run this model: {blocker}; decode without static_cache")
        self._model = weakref.ref(model)  # weak: static_decode(reuse=True) keeps decoders per model
        self.max_len, self.say = max_len, say or (lambda msg: None)
        self.device = next(model.parameters()).device
        if graph and self.device.type != "cuda":
            raise ConfigError(f"CUDA graphs need a CUDA device, the model is on {self.device.type}; use graph=False")
        if not isinstance(prefill_bucket, int) or prefill_bucket < 1:
            raise ConfigError(f"prefill_bucket must be an int >= 1, got {prefill_bucket!r}")
        if fuse_base not in FUSE_BASE:
            raise ConfigError(f"fuse_base must be one of {FUSE_BASE}, got {fuse_base!r}")
        self.fuse_base = fuse_base
        self.graph_wanted, self.fuse_lora, self.group_siblings = graph, fuse_lora, group_siblings
        self.prefill_bucket, self.graph_prefill = prefill_bucket, graph and graph_prefill
        self.graph: torch.cuda.CUDAGraph | None = None
        # graph_prefill: per padded width, its ids buffer and then (graph, logits); widths prefilled eagerly once
        self._prefills: dict[int, tuple[torch.Tensor, tuple[torch.cuda.CUDAGraph, torch.Tensor] | None]] = {}
        self._prefill_pool: Any = None
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        kinds = {type(layer).__name__ for layer in self.cache.layers}
        if kinds != {"StaticLayer"}:  # sliding-window layers keep a host-side length: not replayable
            raise ConfigError(f"static-cache decoding supports full-attention layers only, this model has {kinds}")
        self.kv_index = torch.arange(max_len, device=self.device)  # (L,)
        self.slot = torch.zeros((), dtype=torch.long, device=self.device)  # the cache position of the step's token
        self.ids: torch.Tensor | None = None  # (B, 1) static inputs, made in prefill
        self.positions: torch.Tensor | None = None  # (B, 1)
        self.padding: torch.Tensor | None = None  # (B, L) bool: prompt mask, then True for new tokens
        self.next_slot = 0
        self._out: torch.Tensor | None = None

    @property
    def model(self) -> nn.Module:
        """The model this decoder runs."""
        model = self._model()
        if model is None:
            raise ConfigError("this StaticDecoder's model no longer exists; make a new decoder")
        return model

    def _mask(self, query_slots: torch.Tensor) -> torch.Tensor:
        """The 4D attention mask ``[B, 1, Q, L]`` of queries at ``query_slots`` (Q,): padding and causality."""
        visible = self.padding[:, None, None, :] & (self.kv_index <= query_slots[:, None])  # (B, 1, Q, L)
        if self.model.config._attn_implementation == "sdpa":
            return visible
        dtype = next(self.model.parameters()).dtype
        return torch.where(visible, 0.0, torch.finfo(dtype).min).to(dtype)  # eager attention adds the mask

    def padded_width(self, width: int) -> int:
        """The width :meth:`prefill` runs a ``width``-wide prompt batch at (a multiple of ``prefill_bucket``)."""
        return min(_round_up(width, self.prefill_bucket), self.max_len - 1)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the prompts once, filling the cache.

        Args:
            input_ids: ``[B, W]`` left-padded prompts (``W < max_len``).
            attention_mask: ``[B, W]``, 1 for real tokens.

        Returns:
            The logits of each row's next token, ``[B, vocab]`` float32.

        Raises:
            ConfigError: the prompts leave no room in the cache.
        """
        batch, width = input_ids.shape
        if width >= self.max_len:
            raise ConfigError(f"prompt width {width} leaves no room in a cache of {self.max_len}; raise max_len")
        padded = self.padded_width(width)
        mask = attention_mask.to(self.device, torch.bool)
        if self.padding is None:  # the step's inputs: made once, then written in place (a graph reads them)
            self.padding = torch.ones(batch, self.max_len, dtype=torch.bool, device=self.device)
            self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
            self.positions = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
            first = True
        elif self.padding.shape[0] != batch:
            raise ConfigError(f"this StaticDecoder decodes batches of {self.padding.shape[0]} rows, got {batch}")
        else:  # a later call: the cache's write positions start again at 0 (old keys lie beyond the mask)
            self.padding.fill_(True)
            for layer in self.cache.layers:
                if layer.is_initialized:
                    layer.cumulative_length.zero_()
            first = False
        self.padding[:, : padded - width] = False  # the bucket's extra left padding
        self.padding[:, padded - width : padded] = mask
        self.positions.copy_(mask.sum(-1, keepdim=True))  # (B, 1): the first new token's position per row
        self.slot.fill_(padded)
        self.next_slot = padded  # the same, on the host: only to refuse a step past the cache's end
        ids = F.pad(input_ids.to(self.device), (padded - width, 0))  # a new tensor, the bucket's padding 0
        if not self.graph_prefill:
            return self._run_prefill(ids)
        kept, recorded = self._prefills.get(padded, (None, None))
        ids = ids if kept is None else kept.copy_(ids)  # a recorded prefill reads its own ids buffer
        graphs = sum(r is not None for _, r in self._prefills.values())
        if recorded is None and padded in self._prefills and not first and graphs < PREFILL_GRAPHS:
            if self._prefill_pool is None:  # one memory pool for all prefill graphs: never replayed at once
                self._prefill_pool = torch.cuda.graph_pool_handle()
            recorded = self._record(functools.partial(self._run_prefill, ids), "prefill", self._prefill_pool)
            if recorded is None:
                self.graph_prefill = False
        self._prefills[padded] = (ids, recorded)
        if recorded is None:
            return self._run_prefill(ids)
        recorded[0].replay()
        return recorded[1]

    def _run_prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """The prompt pass on ``ids`` ``[B, W']`` against the prompt mask in ``padding`` (no host reads)."""
        width = ids.shape[1]
        mask = self.padding[:, :width]
        positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)  # as model.generate numbers left padding
        out = self.model(
            input_ids=ids,
            attention_mask=self._mask(torch.arange(width, device=self.device)),
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()

    def _run_step(self) -> torch.Tensor:
        """The decoding step on the static buffers: fixed shapes, no host reads (what a graph records)."""
        out = self.model(
            input_ids=self.ids,
            attention_mask=self._mask(self.slot.view(1)),
            position_ids=self.positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1].float()  # (B, V)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row's last token; the first call records the graph (when asked).

        Args:
            tokens: ``[B]`` token ids.

        Returns:
            The next-token logits ``[B, vocab]`` float32.
        """
        if self.next_slot >= self.max_len:
            raise ConfigError(f"the cache of {self.max_len} positions is full; raise max_len")
        self.next_slot += 1
        self.ids.copy_(tokens.view(-1, 1))
        if self.graph_wanted and self.graph is None:
            recorded = self._record(self._run_step, "step")
            if recorded is None:
                self.graph_wanted = False
            else:
                self.graph, self._out = recorded
        if self.graph is not None:
            self.graph.replay()
            logits = self._out
        else:
            logits = self._run_step()
        self.positions.add_(1)
        self.slot.add_(1)
        return logits

    def _counters(self) -> list[torch.Tensor]:
        return [layer.cumulative_length.clone() for layer in self.cache.layers]

    def _restore(self, saved: list[torch.Tensor]) -> None:
        for layer, value in zip(self.cache.layers, saved):
            layer.cumulative_length.copy_(value)

    def _record(self, run: Any, what: str, pool: Any = None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """Warm ``run`` up on a side stream, then record it: ``(graph, its output)``, or None after saying why.

        The cache's write counters are as before afterwards (the warm-ups write the slots ``run``
        writes, which its replay writes again). ``pool``: a memory pool shared with other graphs
        that are never replayed at once (another graph's replay may overwrite this one's output,
        so it is read before the next replay).
        """
        saved, previous = self._counters(), torch.cuda.get_sync_debug_mode()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        # The LoRA terms' one-kernel route only while warming up and recording the step: the graph keeps it.
        if self.fuse_lora and what == "step":
            route = fused_lora_terms(
                self.model, say=self.say, group_siblings=self.group_siblings, fuse_base=self.fuse_base
            )
        else:
            route = contextlib.nullcontext()
        recorded = None
        with route:
            try:
                with torch.cuda.stream(side):
                    torch.cuda.set_sync_debug_mode("error")  # a host read in the step raises here, naming the op
                    try:
                        for _ in range(_WARMUP):
                            run()
                            self._restore(saved)
                    finally:
                        torch.cuda.set_sync_debug_mode(previous)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = run()
                recorded = graph, out
            except Exception as e:  # noqa: BLE001 - a host read (RuntimeError), or Triton failing on a shape
                torch.cuda.current_stream(self.device).wait_stream(side)
                self.say(f"CUDA graph decoding off, the {what} runs eagerly: {str(e).splitlines()[0]}")
        self._restore(saved)
        return recorded


def _next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, generator: Any) -> torch.Tensor:
    """Greedy or temperature-sampled next tokens ``[B]`` from logits ``[B, V]`` (model.generate's order of ops)."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _state_key(model: nn.Module) -> tuple:
    """What a recorded step depends on beyond its own buffers: every weight's and buffer's address
    (a tensor replaced, e.g. by loading an adapter again, moves), the adapters' states and routes."""
    states = tuple(
        (tuple(m.active_adapters), tuple(m.merged_adapters), m.disabled, routing.forward_owner(m))
        if isinstance(m, LoraLayer)
        else (m.active_adapter, m.disabled, routing.forward_owner(m))  # which copy of a saved module runs
        for m in model.modules()
        if isinstance(m, (LoraLayer, ModulesToSaveWrapper))
    )
    tensors = tuple((t.data_ptr(), t.dtype, t.shape) for t in itertools.chain(model.parameters(), model.buffers()))
    return states, tensors, model.training, model.config._attn_implementation


@torch.inference_mode()
def static_decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    graph: str = "auto",
    say: Any = None,
    fuse_lora: bool = True,
    group_siblings: bool = True,
    fuse_base: str = "groups",
    reuse: bool = True,
) -> torch.Tensor:
    """Continue a batch of left-padded prompts with a static KV cache (greedy, or sampled with a temperature).

    The same tokens as ``model.generate`` (greedy; sampling draws in its order from the same
    generator): rows that emit an EOS token are padded with ``pad_token_id`` afterwards, and
    decoding stops once every row has.

    Args:
        model: A transformers causal LM in eval mode (lorakit adapters stay unmerged).
        input_ids: ``[B, W]`` prompts, left-padded.
        attention_mask: ``[B, W]``, 1 for real tokens.
        max_new_tokens: Most tokens per row.
        eos_token_id: Token id(s) that end a row; None: rows run to ``max_new_tokens``.
        pad_token_id: Filler after a row's EOS (default: the first EOS id).
        do_sample: Sample from ``softmax(logits / temperature)`` instead of the argmax.
        temperature: Sampling temperature (> 0).
        generator: Random generator for sampling (None: torch's default, as ``model.generate``).
        graph: ``"auto"``: replay the step as a CUDA graph on a CUDA device, eager elsewhere;
            ``"on"``: a CUDA graph or an error; ``"off"``: eager.
        say: Called with one line when capture fails and decoding goes on eagerly (``"auto"``).
        fuse_lora: In a recorded graph, each unmerged LoRA term as one kernel (:class:`StaticDecoder`).
        group_siblings: With ``fuse_lora``, one kernel per group of projections reading one input
            (q/k/v, gate/up; :class:`StaticDecoder`).
        fuse_base: With ``fuse_lora``, the base matmul in the LoRA term's kernel (:class:`StaticDecoder`).
        reuse: Keep this call's decoder (its KV cache and recorded graphs) for the model's next call of
            the same batch size and cache length (``prompt width + max_new_tokens``, the width rounded
            up to :data:`PREFILL_BUCKET` and the sum to :data:`REUSE_BUCKET`), so that call records
            no step graph, and a graphed one replays its prefill too once a padded width recurs
            (as transformers' ``generate`` keeps its static cache). One decoder per model, held
            until the model is gone or :func:`forget` is called, and replaced when any weight or
            buffer moves or an adapter's state or route changes (in-place weight updates are read
            by the graph as they are). False: a fresh decoder, dropped after the call.

    Returns:
        The new tokens ``[B, n]`` on the model's device, ``n <= max_new_tokens``.

    Raises:
        ConfigError: a bad argument, a model :func:`capture_blocker` refuses, or ``graph="on"``
            where no graph can be recorded.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
    if graph not in ("auto", "on", "off"):
        raise ConfigError(f"graph must be 'auto', 'on' or 'off', got {graph!r}.")
    if do_sample and not temperature > 0:
        raise ConfigError(f"temperature must be > 0 when sampling, got {temperature!r}.")
    device = next(model.parameters()).device
    graphed = graph == "on" or (graph == "auto" and device.type == "cuda")
    max_len = input_ids.shape[1] + max_new_tokens
    bucket = PREFILL_BUCKET if reuse and graphed else 1  # prompts padded to widths a kept prefill graph fits
    decoder = None
    if reuse:
        max_len = _round_up(_round_up(input_ids.shape[1], bucket) + max_new_tokens, REUSE_BUCKET)
        key = (input_ids.shape[0], max_len, graphed, fuse_lora, group_siblings, fuse_base, _state_key(model))
        kept = _KEPT.get(model)
        decoder = kept[1] if kept is not None and kept[0] == key else None
    if decoder is None:
        decoder = StaticDecoder(
            model,
            max_len,
            graph=graphed,
            say=say or print,
            fuse_lora=fuse_lora,
            group_siblings=group_siblings,
            fuse_base=fuse_base,
            prefill_bucket=bucket,
            graph_prefill=reuse,
        )
        if reuse:
            _KEPT[model] = (key, decoder)
    eos = torch.tensor([] if eos_token_id is None else _as_list(eos_token_id), dtype=torch.long, device=device)
    pad = pad_token_id if pad_token_id is not None else (_as_list(eos_token_id)[0] if eos_token_id is not None else 0)
    sync_every = SYNC_EVERY if device.type == "cuda" else 1

    tokens = _next_tokens(decoder.prefill(input_ids, attention_mask), do_sample, temperature, generator)
    alive = ~torch.isin(tokens, eos)
    out, alive_after = [tokens], [alive.any()]
    for t in range(1, max_new_tokens):
        if t % sync_every == 0 and not bool(alive_after[-1]):
            break
        tokens = _next_tokens(decoder.step(tokens), do_sample, temperature, generator)
        tokens = torch.where(alive, tokens, pad)
        alive = alive & ~torch.isin(tokens, eos)
        out.append(tokens)
        alive_after.append(alive.any())
        if graph == "on" and decoder.graph is None:
            raise ConfigError("graph='on' but the decoding step could not be recorded as a CUDA graph (see above)")
    done = (~torch.stack(alive_after)).nonzero()  # steps after which every row had stopped
    n = int(done[0, 0]) + 1 if len(done) else len(out)
    return torch.stack(out[:n], dim=1)


def forget(model: nn.Module) -> None:
    """Drop the decoder :func:`static_decode` keeps for ``model`` (its KV cache and graphs), if any."""
    _KEPT.pop(model, None)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _as_list(ids: int | Sequence[int]) -> list[int]:
    return [ids] if isinstance(ids, int) else list(ids)


def fake_step(model: nn.Module, batch: int = 2, width: int = 4, max_new_tokens: int = 3) -> torch.Tensor:
    """Run prefill and one decoding step of ``model`` on fake tensors: the CPU's capturability check.

    Under torch's ``FakeTensorMode`` tensors have shapes, dtypes and devices but no values, so
    anything in the step that reads a value on the host (``.item()``, ``.tolist()``, ``bool(t)``,
    ``int(t)``, ``torch.equal``, ``torch.nonzero``, boolean indexing) raises, as it would break a
    CUDA graph's capture. The model's own parameters are read, never written. Not caught here: a
    step that builds a new host tensor and copies it to the device (the CUDA warm-up's sync check
    catches that).

    Args:
        model: The model (eval mode; not modified).
        batch: Rows of the dummy batch.
        width: Its prompt width.
        max_new_tokens: Room in its cache.

    Returns:
        The step's (fake) logits, ``[batch, vocab]``.

    Raises:
        torch._subclasses.fake_tensor.DataDependentOutputException / DynamicOutputShapeException:
            something in the step reads a tensor's value (the exception names the op).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = next(model.parameters()).device
    with torch.inference_mode(), FakeTensorMode(allow_non_fake_inputs=True):
        ids = torch.zeros(batch, width, dtype=torch.long, device=device)
        decoder = StaticDecoder(model, width + max_new_tokens)
        logits = decoder.prefill(ids, torch.ones_like(ids))
        return decoder.step(logits.argmax(-1))
