"""OpenAI's request bodies as pydantic models, what they turn into, and the error shape.

:mod:`.app` parses requests with these models; a body that does not fit them is a
422 naming the field. The checks that need the model (prompt length against the
context, ``max_tokens`` against the server's limit, ``stop``) are in
:func:`sampling_params` and raise :class:`APIError`, answered in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .engine import SamplingParams

__all__ = [
    "APIError",
    "ServeLimits",
    "RequestBody",
    "CompletionBody",
    "ChatBody",
    "LoadBody",
    "UnloadBody",
    "completion_prompt_ids",
    "chat_prompt_ids",
    "sampling_params",
    "sse",
]


class APIError(Exception):
    """An error answered in OpenAI's shape with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}},
            status_code=self.status,
        )


class ServeLimits(BaseModel):
    """Bounds on what one request may ask.

    Attributes:
        max_request_bytes: largest request body accepted.
        max_tokens: largest ``max_tokens`` accepted.
    """

    max_request_bytes: int = 1 << 20
    max_tokens: int = 4096


class RequestBody(BaseModel):
    """The fields completions and chat share (OpenAI's names; unknown fields are ignored)."""

    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, logit_bias, ...)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False  # vLLM's extra field: generate max_tokens tokens whatever comes


class CompletionBody(RequestBody):
    prompt: str | list[str] | list[int]


class _ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[_ContentPart]


class ChatBody(RequestBody):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class LoadBody(BaseModel):
    lora_name: str
    lora_path: str


class UnloadBody(BaseModel):
    lora_name: str


def completion_prompt_ids(tokenizer: Any, body: CompletionBody) -> list[int]:
    """Token ids of a completion's ``prompt`` (a string, a one-string list, or token ids)."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return list(prompt)
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(
                400,
                f"prompt holds {len(prompt)} strings; this server answers one prompt per request (n=1).",
                param="prompt",
            )
        prompt = prompt[0]
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def chat_prompt_ids(tokenizer: Any, body: ChatBody) -> list[int]:
    """Token ids of a chat's ``messages``: the chat template with the generation prompt."""
    messages = [
        {
            "role": m.role if m.role != "developer" else "system",
            "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content),
        }
        for m in body.messages
    ]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def sampling_params(
    body: RequestBody, max_tokens: int | None, prompt_len: int, context: int, limits: ServeLimits, prompt_field: str
) -> SamplingParams:
    if prompt_len == 0:
        raise APIError(400, f"{prompt_field} is empty; send at least one token.", param=prompt_field)
    if prompt_len >= context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens, but the {prompt_field} has "
            f"{prompt_len} tokens. Shorten it.",
            param=prompt_field,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(16 if prompt_field == "prompt" else limits.max_tokens, context - prompt_len)
    if max_tokens > limits.max_tokens:
        raise APIError(
            400, f"max_tokens={max_tokens} is over this server's limit of {limits.max_tokens}.", param="max_tokens"
        )
    if prompt_len + max_tokens > context:
        raise APIError(
            400,
            f"This model's maximum context length is {context} tokens; the {prompt_field} has "
            f"{prompt_len} tokens and max_tokens asks for {max_tokens} more. Lower max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or not all(stop):
        raise APIError(400, f"stop={body.stop!r}: give up to 4 non-empty strings.", param="stop")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=tuple(stop),
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )


def sse(payload: dict | str) -> str:
    """One server-sent event: ``data: <json>`` (or ``data: [DONE]``) and a blank line."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
