"""The OpenAI chat-completions wire format: request validation, error objects, response bodies.

Types are checked strictly (a string where a number belongs is an error, not coerced) and
every problem becomes OpenAI's error object with a 4xx status, naming the offending parameter:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": ...}}

Extensions beside OpenAI's parameters, named as vLLM names them: `top_k`, `ignore_eos`.
"""
from __future__ import annotations

import json
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_N = 128  # choices per request; each one is a row in the batch


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------
# Request
# ---------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # unknown fields are ignored, as vLLM does


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_chat(self) -> dict:
        """→ {'role', 'content': str}; 'developer' is OpenAI's newer name for 'system'."""
        content = self.content or ""
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    # accepted only at values that change nothing, so a client is never silently misled
    logprobs: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_request(raw: bytes) -> ChatRequest:
    """Request body → ChatRequest, or APIError(400) saying what is wrong and where."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object", code="invalid_json")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param_path(data, err["loc"], missing=err["type"] == "missing")
        kind = err["type"]
        code = "missing_required_parameter" if kind == "missing" else \
            "invalid_type" if kind.endswith("_type") else "invalid_value"
        raise APIError(400, f"Invalid value for '{param}': {err['msg']}", param=param, code=code) from None
    if any(not s for s in req.stops):
        raise APIError(400, "Invalid value for 'stop': stop strings must not be empty", param="stop",
                       code="invalid_value")
    for name in ("logprobs", "presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    return req


def _param_path(data, loc: tuple, missing: bool = False) -> str:
    """The error's location as far as it exists in the input ('messages.0.content'), leaving out
    the type labels pydantic adds when it tried the members of a union.

    >>> _param_path({"stop": 5}, ("stop", "str"))
    'stop'
    >>> _param_path({"stop": {"a": 1}}, ("stop", "str"))
    'stop'
    >>> _param_path({"messages": [{"content": "hi"}]}, ("messages", 0, "role"), missing=True)
    'messages.0.role'
    """
    parts, node = [], data
    for i, key in enumerate(loc):
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
        elif not (missing and isinstance(node, dict) and i == len(loc) - 1):  # a union member's label
            break
        parts.append(str(key))
    return ".".join(parts)


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}}


def completion_body(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    """choices: [{'reasoning', 'content', 'finish_reason'}] in index order."""
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "logprobs": None, "finish_reason": c["finish_reason"],
                         "message": {"role": "assistant", "content": c["content"],
                                     "reasoning_content": c["reasoning"]}}
                        for i, c in enumerate(choices)],
            "usage": use}


def chunk(rid: str, model: str, created: int, choices: list[dict], use: dict | None = None,
          with_usage: bool = False) -> str:
    """One server-sent event of a streamed completion."""
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if with_usage:  # OpenAI sends "usage": null on every chunk once include_usage is asked for
        body["usage"] = use
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def delta_choice(index: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
