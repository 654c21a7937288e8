"""The HTTP side: OpenAI's routes and schema on FastAPI, errors in OpenAI's JSON shape.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream`` as server-sent events ending in ``data: [DONE]``), and, only with an admin
token, vLLM's ``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter``.

Every error is ``{"error": {"message", "type", "param", "code"}}``: 404 for an unknown
model (listing the available ones) or route, 400 for malformed JSON, a prompt longer than
the context or a bad value, 422 for a missing or mistyped field (``param`` names it) and for
an adapter that does not fit the base, 401 for an admin call without the token, 413 for a
body over the size limit. A failing request never stops the server.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    AdapterFormatError,
    AdapterNotFoundError,
    ConfigError,
    LorakitError,
    ModelMismatchError,
    TargetNotFoundError,
)
from .engine import Engine
from .engine import Request as EngineRequest
from .schema import (
    APIError,
    ChatBody,
    CompletionBody,
    LoadBody,
    RequestBody,
    ServeLimits,
    UnloadBody,
    chat_prompt_ids,
    completion_prompt_ids,
    sampling_params,
    sse,
)

__all__ = ["create_app"]


def _check_admin(request: Request, token: str | None) -> None:
    if token is None:
        raise APIError(
            404,
            "the admin API is off; start the server with --admin-token to load and unload adapters.",
            code="admin_disabled",
        )
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise APIError(
            401,
            "admin calls need the header 'Authorization: Bearer <admin token>'.",
            type_="authentication_error",
            code="invalid_api_key",
        )


class _BodyLimit:
    """ASGI middleware: reject request bodies over ``limit`` bytes with 413, before any parsing."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks, size, more = [], 0, True
        while more and not too_big:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            too_big = size > self.limit
        if too_big:
            err = APIError(413, f"request body over {self.limit} bytes.", code="request_too_large")
            return await err.response()(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# ------------------------------------------------------------------------- the app


def create_app(
    engine: Engine, *, admin_token: str | None = None, limits: ServeLimits | None = None, created: int | None = None
) -> FastAPI:
    """The FastAPI app serving ``engine``'s model and adapters (the engine is started and stopped with it).

    Args:
        engine: the generation engine (its registry names the models).
        admin_token: enables the admin routes, which then require ``Authorization: Bearer <token>``.
        limits: request bounds.
        created: the ``created`` time reported for the models (default: now).

    Returns:
        The app, for uvicorn.
    """
    import contextlib

    limits = limits or ServeLimits()
    registry, tokenizer = engine.registry, engine.tokenizer
    created = int(time.time()) if created is None else created

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_BodyLimit, limit=limits.max_request_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return APIError(
                400,
                f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')}).",
                code="invalid_json",
            ).response()
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        field = ".".join(loc) or None
        if first.get("type") == "model_attributes_type":
            return APIError(400, "the request body must be a JSON object.", code="invalid_json").response()
        return APIError(
            422,
            f"{field or 'body'}: {first.get('msg', 'invalid value')}"
            f"{' (got ' + repr(first['input']) + ')' if 'input' in first and field else ''}.",
            param=field,
            code="invalid_value",
        ).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error").response()

    def _acquire(model: str) -> str:
        try:
            return registry.acquire(model)
        except AdapterNotFoundError as exc:
            raise APIError(404, str(exc), param="model", code="model_not_found") from None

    @app.get("/v1/models")
    async def models() -> dict:
        data = [
            {
                "id": registry.base_id,
                "object": "model",
                "created": created,
                "owned_by": "lorakit",
                "root": registry.base_id,
                "parent": None,
            }
        ]
        for info in registry.adapters():
            data.append(
                {
                    "id": info.name,
                    "object": "model",
                    "created": created,
                    "owned_by": "lorakit",
                    "root": info.path,
                    "parent": registry.base_id,
                    "lora": {
                        "r": info.r,
                        "lora_alpha": info.lora_alpha,
                        "target_modules": info.target_modules,
                        "sha256": info.sha256,
                    },
                }
            )
        return {"object": "list", "data": data}

    async def _run(body: RequestBody, ids: list[int], max_tokens: int | None, prompt_field: str, chat: bool) -> Any:
        params = sampling_params(body, max_tokens, len(ids), engine.context, limits, prompt_field)
        adapter = _acquire(body.model)
        req = engine.submit(EngineRequest(adapter, ids, params, loop=asyncio.get_running_loop()))
        rid = ("chatcmpl-" if chat else "cmpl-") + req.id
        now = int(time.time())

        def usage() -> dict:
            return {
                "prompt_tokens": len(ids),
                "completion_tokens": len(req.generated),
                "total_tokens": len(ids) + len(req.generated),
            }

        if body.stream:
            return StreamingResponse(_stream(req, body, rid, now, chat, usage), media_type="text/event-stream")
        try:
            while True:
                kind, value = await req.events.get()
                if kind == "error":
                    raise APIError(500, f"generation failed: {value}", type_="server_error")
                if kind == "done":
                    break
        finally:
            req.cancelled = req.finish_reason is None  # the client went away: stop generating for it
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": req.text},
                "logprobs": None,
                "finish_reason": req.finish_reason,
            }
            return {
                "id": rid,
                "object": "chat.completion",
                "created": now,
                "model": body.model,
                "choices": [choice],
                "usage": usage(),
            }
        choice = {"index": 0, "text": req.text, "logprobs": None, "finish_reason": req.finish_reason}
        return {
            "id": rid,
            "object": "text_completion",
            "created": now,
            "model": body.model,
            "choices": [choice],
            "usage": usage(),
        }

    async def _stream(
        req: EngineRequest, body: RequestBody, rid: str, now: int, chat: bool, usage: Any
    ) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": obj, "created": now, "model": body.model, "choices": [choice]}

        try:
            if chat:
                yield sse(chunk("", None, first=True))
            while True:
                kind, value = await req.events.get()
                if kind == "delta":
                    yield sse(chunk(value, None))
                elif kind == "done":
                    yield sse(chunk(None, value))
                    break
                else:
                    yield sse(
                        {
                            "error": {
                                "message": f"generation failed: {value}",
                                "type": "server_error",
                                "param": None,
                                "code": None,
                            }
                        }
                    )
                    break
            if (body.stream_options or {}).get("include_usage"):
                yield sse(
                    {"id": rid, "object": obj, "created": now, "model": body.model, "choices": [], "usage": usage()}
                )
            yield sse("[DONE]")
        finally:
            req.cancelled = req.finish_reason is None

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Any:
        return await _run(body, completion_prompt_ids(tokenizer, body), body.max_tokens, "prompt", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody) -> Any:
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _run(body, chat_prompt_ids(tokenizer, body), max_tokens, "messages", chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadBody, request: Request) -> dict:
        _check_admin(request, admin_token)
        future = engine.call(lambda: registry.load(body.lora_name, body.lora_path))
        try:
            info = await asyncio.wrap_future(future)
        except (ModelMismatchError, TargetNotFoundError) as exc:
            raise APIError(
                422,
                f"adapter {body.lora_name!r} does not fit the base model {registry.base_id!r}: {exc}",
                param="lora_path",
                code="adapter_mismatch",
            ) from None
        except ConfigError as exc:
            raise APIError(400, str(exc), param="lora_name", code="invalid_adapter_name") from None
        except (AdapterFormatError, LorakitError) as exc:
            raise APIError(400, str(exc), param="lora_path", code="invalid_adapter") from None
        return {
            "object": "lora_adapter",
            "id": info.name,
            "parent": registry.base_id,
            "sha256": info.sha256,
            "message": f"Success: LoRA adapter '{info.name}' added successfully.",
        }

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadBody, request: Request) -> dict:
        _check_admin(request, admin_token)
        try:
            users = registry.unload(body.lora_name)
        except AdapterNotFoundError as exc:
            raise APIError(404, str(exc), param="lora_name", code="model_not_found") from None
        engine.call(registry.collect)
        return {
            "object": "lora_adapter",
            "id": body.lora_name,
            "running_requests": users,
            "message": f"Success: LoRA adapter '{body.lora_name}' removed"
            f"{'' if not users else f'; its memory is freed when its {users} running request(s) end'}.",
        }

    return app
