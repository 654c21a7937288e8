"""The generation engine: one thread owns the model and steps every running request together.

Requests wait in a queue; between two decoding steps the engine admits new ones (up to
``max_batch`` running), runs their prompts as one batch (a prefill with one adapter per
row, :func:`lorakit.mixed.adapter_batch`) and adds them to the running batch. Each step
then feeds every running request its last token in one forward pass, each row with its
own adapter, and samples the next token per request (its own temperature, top_p, seed).
So a request starts at the next step, whatever else is running, and never waits for a
long one to finish.

The running batch shares one KV cache, left-padded: a request that joins is padded on
the left to the batch's width (or the batch to its), its attention mask hides the
padding, and its position ids count only its own tokens, so every row computes what it
would compute alone. Finished rows leave the cache at once; columns that only padding
uses are trimmed.

Admin work that changes the model (loading, unloading adapters) runs on the same thread,
between steps (:meth:`Engine.call`), so no forward pass ever sees a half-changed model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..mixed import adapter_batch
from .registry import AdapterRegistry

__all__ = ["SamplingParams", "Request", "Engine"]

log = logging.getLogger("lorakit.serve")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is continued.

    Attributes:
        max_tokens: most tokens to generate.
        temperature: 0 for greedy decoding, else the softmax temperature.
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p``.
        stop: strings that end the answer (not included in it).
        seed: seed of the request's own random generator (None: a random one).
        ignore_eos: keep generating past the end-of-sequence token (vLLM's ``ignore_eos``; benchmarks).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


class Request:
    """One request in the engine: its prompt, adapter, sampling and where its output goes.

    Events are delivered to ``events`` (an ``asyncio.Queue`` of the server's loop):
    ``("delta", text)`` as text becomes final, then ``("done", finish_reason)``;
    ``finish_reason`` is ``"stop"`` (end of sequence or a stop string) or ``"length"``.
    """

    def __init__(
        self,
        adapter: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.id = uuid.uuid4().hex[:24]
        self.adapter = adapter
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.loop = loop
        self.events: asyncio.Queue | queue.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        self.generated: list[int] = []
        self.text = ""  # the answer so far (stop strings cut off)
        self.sent = 0  # characters of text already delivered
        self.finish_reason: str | None = None
        self.cancelled = False
        self.pending: int | None = None  # sampled token not yet in the KV cache
        self.length = 0  # tokens of this row in the KV cache
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(6), "little")
        self.generator = torch.Generator().manual_seed(seed)
        self.started = time.perf_counter()

    def _emit(self, event: tuple) -> None:
        if self.loop is None:
            self.events.put_nowait(event)
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the server's loop is closed: nobody is listening any more
            pass


class Engine:
    """Runs requests on a model with many adapters: step-wise batching across adapters.

    Args:
        model: a causal LM (with adapters loaded through ``registry``); evaluated as it is.
        tokenizer: its tokenizer.
        registry: the adapters the engine may use.
        max_batch: most requests running at once; others wait in the queue.
    """

    def __init__(self, model: Any, tokenizer: Any, registry: AdapterRegistry, max_batch: int = 8) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch={max_batch!r} must be an int >= 1.")
        self.model, self.tokenizer, self.registry, self.max_batch = model, tokenizer, registry, max_batch
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos = eos
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device = next(model.parameters()).device
        _check_cache_layout(model)
        # only the last position's logits are needed after a prompt (most transformers LMs can skip the rest)
        self._last_only = (
            {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        )
        self._queue: queue.Queue = queue.Queue()
        self._calls: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rows: list[Request] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # (B, W): 1 for a real token in the cache, 0 for padding

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        """Start the engine thread."""
        self._thread = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running requests, then stop the thread (waits up to ``timeout`` seconds)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request) -> Request:
        """Queue ``request``; it starts at the engine's next step."""
        self._queue.put(request)
        self._wake.set()
        return request

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between two steps; its result (or error) comes in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._thread is None or not self._thread.is_alive():  # not started: nothing runs concurrently
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(exc)
            return future
        self._calls.put((fn, future))
        self._wake.set()
        return future

    @property
    def running(self) -> int:
        """Requests in the running batch."""
        return len(self._rows)

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                self._run_calls()
                self.registry.collect()  # unloads whose last request finished
                admitted = self._admit()
                if not self._rows and not admitted:
                    if self._stop.is_set() and self._queue.empty():
                        return
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                try:
                    if admitted:
                        self._prefill(admitted)
                    if self._rows:
                        self._decode()
                except Exception as exc:  # noqa: BLE001 - fail these requests, keep serving the others
                    log.exception("generation step failed")
                    for req in [*self._rows, *admitted]:
                        if req.finish_reason is None:
                            self._finish(req, "error", error=f"{type(exc).__name__}: {exc}")
                    self._rows, self._cache, self._mask = [], None, None

    def _run_calls(self) -> None:
        with torch.inference_mode(False):  # weights loaded here must be ordinary tensors, not inference tensors
            self._run_pending_calls()

    def _run_pending_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(exc)

    def _admit(self) -> list[Request]:
        admitted = []
        while len(self._rows) + len(admitted) < self.max_batch:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                break
            if req.cancelled:
                self._finish(req, "cancelled")
                continue
            admitted.append(req)
        return admitted

    def _prefill(self, reqs: list[Request]) -> None:
        """Run the new prompts as one left-padded batch and add them to the running batch."""
        from transformers import DynamicCache

        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.tensor([[self.pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in reqs], device=self.device)
        mask = torch.tensor(
            [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in reqs], device=self.device
        )
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        with adapter_batch(self.model, [r.adapter for r in reqs]):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                **self._last_only,
            )
        for r in reqs:
            r.length = len(r.prompt_ids)
        self._join(out.past_key_values, mask, reqs)
        self._sample(reqs, out.logits[:, -1])

    def _decode(self) -> None:
        """One step: every running request's pending token through the model, one row each."""
        rows = self._rows
        ids = torch.tensor([[r.pending] for r in rows], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], 1)
        positions = torch.tensor([[r.length] for r in rows], device=self.device)
        with adapter_batch(self.model, [r.adapter for r in rows]):
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self._cache, use_cache=True
            )
        self._cache, self._mask = out.past_key_values, mask
        for r in rows:
            r.length += 1
        self._sample(rows, out.logits[:, -1])

    def _join(self, cache: Any, mask: torch.Tensor, reqs: list[Request]) -> None:
        """Add prefilled rows to the running batch, left-padding whichever is narrower."""
        if self._cache is None:
            self._cache, self._mask, self._rows = cache, mask, list(reqs)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, width, -2), _pad_left(new.keys, width, -2)])
            old.values = torch.cat([_pad_left(old.values, width, -2), _pad_left(new.values, width, -2)])
        self._mask = torch.cat([_pad_left(self._mask, width, -1), _pad_left(mask, width, -1)])
        self._rows = [*self._rows, *reqs]

    def _sample(self, rows: list[Request], logits: torch.Tensor) -> None:
        """Next token per row, then drop the rows that finished."""
        logits = logits.float().cpu()  # (B, vocab)
        for i, req in enumerate(rows):
            if req.cancelled:
                self._finish(req, "cancelled")
                continue
            token = _sample_token(logits[i], req.params, req.generator)
            if token in self.eos and not req.params.ignore_eos:
                self._finish(req, "stop")
                continue
            req.generated.append(token)
            req.pending = token
            self._advance_text(req)
            if req.finish_reason is None and len(req.generated) >= req.params.max_tokens:
                self._finish(req, "length")
            elif req.finish_reason is None and req.length >= self.context:  # no position left for the next token
                self._finish(req, "length")
        self._drop_finished()

    def _advance_text(self, req: Request) -> None:
        text = self.tokenizer.decode(req.generated, skip_special_tokens=True)
        stops = req.params.stop
        if stops:
            hits = [text.find(s) for s in stops if s and s in text]
            if hits:
                req.text = text[: min(hits)]
                self._finish(req, "stop")
                return
        req.text = text
        # Deliver what can no longer change: hold back a possible start of a stop string and a partial character.
        hold = max((len(s) - 1 for s in stops), default=0)
        final = len(text) - hold
        while final > req.sent and text[final - 1] == "\ufffd":
            final -= 1
        if final > req.sent:
            req._emit(("delta", text[req.sent : final]))
            req.sent = final

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        req.finish_reason = reason
        if error is None and req.sent < len(req.text):
            req._emit(("delta", req.text[req.sent :]))
            req.sent = len(req.text)
        req._emit(("error", error) if error is not None else ("done", reason))
        self.registry.release(req.adapter)
        log.info(
            "request %s adapter=%s prompt_tokens=%d completion_tokens=%d finish=%s latency=%.3fs",
            req.id,
            req.adapter,
            len(req.prompt_ids),
            len(req.generated),
            reason,
            time.perf_counter() - req.started,
        )

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if r.finish_reason is None]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        first = int((mask.sum(0) > 0).nonzero()[0])  # columns before this hold padding only
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[..., first:, :]
            layer.values = layer.values.index_select(0, index)[..., first:, :]
        self._mask = mask[:, first:]
        self._rows = [self._rows[i] for i in keep]


def _check_cache_layout(model: Any) -> None:
    """The running batch's KV cache is padded and sliced by hand: only plain full-attention layers allow that.

    Raises:
        ConfigError: the model's cache has other layers (sliding windows, linear attention, ...).
    """
    from transformers import DynamicCache

    try:
        kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot build a cache from
        raise ConfigError(f"cannot serve {type(model).__name__}: no KV cache for its config ({exc}).") from None
    if kinds - {"DynamicLayer"}:
        raise ConfigError(
            f"cannot serve {type(model).__name__} yet: its KV cache has {', '.join(sorted(kinds))} layers, and "
            f"lorakit serve batches only full-attention caches (DynamicLayer); use a model without sliding-window "
            f"or linear-attention layers."
        )


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` with zeros prepended along ``dim`` up to ``width``."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim)


def _sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Greedy at temperature 0, else temperature + nucleus (top_p) sampling from ``generator``."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = F.softmax(logits / params.temperature, -1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs[before >= params.top_p] = 0  # keep the smallest head whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
