"""``lorakit serve``: one base model, many adapters, OpenAI's HTTP API (FastAPI + uvicorn).

Layout: :mod:`.registry` loads, validates and unloads adapters; :mod:`.engine` batches
every running request step by step, one adapter per row; :mod:`.schema` holds OpenAI's
request bodies and error shape; :mod:`.app` is the HTTP side.
:func:`serve` wires them and runs uvicorn; :func:`build_app` does the same without
running it (tests, embedding in another ASGI server). Inference code only: nothing here
imports :mod:`lorakit.train`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .app import create_app
from .engine import Engine, Request, SamplingParams
from .registry import AdapterInfo, AdapterRegistry
from .schema import APIError, ServeLimits

__all__ = [
    "serve",
    "build_app",
    "Engine",
    "Request",
    "SamplingParams",
    "AdapterRegistry",
    "AdapterInfo",
    "APIError",
    "ServeLimits",
]

log = logging.getLogger("lorakit.serve")


def _base_id(model: str | os.PathLike[str] | None) -> str:
    from ..models import DEFAULT_MODEL

    if model is None:
        return DEFAULT_MODEL
    return Path(model).name if os.path.exists(model) else str(model)


def build_app(
    model: str | os.PathLike[str] | dict[str, Any] | None = None,
    adapters: Mapping[str, str | os.PathLike[str]] | None = None,
    *,
    max_batch: int = 8,
    admin_token: str | None = None,
    limits: ServeLimits | None = None,
    dtype: str | None = None,
    device: str | None = None,
    loaded: tuple[Any, Any] | None = None,
    quantize: str | None = None,
) -> Any:
    """Load the base model and adapters and return the FastAPI app that serves them.

    Args:
        model: the base model (a directory, a name lorakit resolves; None: the embedded default), or a
            mapping ``{name, quantization: nf4 | fp4, double_quant, compute_dtype}`` as a run config's ``model``.
        adapters: ``{name: adapter directory}`` to serve from the start.
        max_batch: most requests generated together.
        admin_token: turns the admin routes on, guarded by this bearer token.
        limits: bounds on request size and ``max_tokens``.
        dtype: weight dtype (``"fp32"``, ``"bf16"``...); None keeps the stored one.
        device: where to run (``"cpu"``, ``"cuda"``); None: CPU.
        loaded: an already loaded ``(model, tokenizer)`` to serve instead of loading ``model``.
        quantize: ``"int8"``: the base's Linear layers int8 and its output head's weights int8, as ``lorakit
            generate --quantize int8`` (CPU; :func:`lorakit.int8_model.quantize_for_inference`; the head stays
            fp32 when an adapter served from the start adapts or replaces it); ``"nf4"`` / ``"fp4"``: a 4-bit
            base; None / ``"none"``: as stored.

    Returns:
        The app (its lifespan starts and stops the engine).

    Raises:
        ModelLoadError: the base model cannot be loaded.
        ModelMismatchError, AdapterFormatError, ConfigError: an adapter does not fit or cannot be read.
    """
    from ..models import ModelSpec, load_model

    spec = ModelSpec.parse(model)  # a name, or {name, quantization: nf4 | fp4, ...} for a 4-bit (QLoRA) base
    q = str(quantize or "none").lower()
    if q in ("nf4", "fp4"):
        spec = dataclasses.replace(spec, quantization=q)
    model = spec.name
    if loaded is None:
        loaded = load_model(model, dtype=dtype, device=device, **spec.load_kwargs())
    base, tokenizer = loaded
    if q not in ("none", "nf4", "fp4"):
        from ..int8_model import quantize_for_inference
        from ..io import read_adapter, touches_output_head
        from ..runs import find_adapter_dir

        keys = [k for path in (adapters or {}).values() for k in read_adapter(find_adapter_dir(path)[0])[1]]
        quantize_for_inference(base, q, tokenizer, head=not touches_output_head(base, keys))
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    registry = AdapterRegistry(base, _base_id(model))
    for name, path in (adapters or {}).items():
        registry.load(name, path)
    return create_app(Engine(base, tokenizer, registry, max_batch=max_batch), admin_token=admin_token, limits=limits)


def serve(
    model: str | os.PathLike[str] | dict[str, Any] | None = None,
    adapters: Mapping[str, str | os.PathLike[str]] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    admin_token: str | None = None,
    limits: ServeLimits | None = None,
    dtype: str | None = None,
    device: str | None = None,
    quantize: str | None = None,
) -> None:
    """Serve the base model and adapters over OpenAI's API until Ctrl-C / SIGTERM.

    On a stop signal the server stops accepting connections, lets the running requests
    finish (uvicorn's graceful shutdown), then stops the engine. One log line per request
    (adapter, tokens, latency) goes to the console.

    Args:
        model, adapters, max_batch, admin_token, limits, dtype, device, quantize: as in :func:`build_app`.
        host: the address to bind (loopback by default; another address exposes the server).
        port: the TCP port.

    Raises:
        ConfigError: a bad port.
    """
    import uvicorn

    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port={port!r} must be in 0..65535.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("lorakit.serve").setLevel(logging.INFO)
    app = build_app(
        model,
        adapters,
        max_batch=max_batch,
        admin_token=admin_token,
        limits=limits,
        dtype=dtype,
        device=device,
        quantize=quantize,
    )
    log.info("serving on http://%s:%d/v1 (admin API %s)", host, port, "on" if admin_token else "off")
    # uvicorn drains the running requests on SIGINT / SIGTERM, then raises the signal again with the handlers
    # that were there before it: these make that last step a clean exit instead of a traceback or a kill.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stopped)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=60)


def _stopped(signum: int, frame: Any) -> None:
    log.info("stopped (%s) after the running requests finished", signal.Signals(signum).name)
    raise SystemExit(0)
