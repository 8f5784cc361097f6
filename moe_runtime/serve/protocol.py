"""The OpenAI request schemas this server accepts, and its error shape.

Every field of OpenAI's completions and chat-completions request schemas is accepted (clients send many:
``stream_options``, ``presence_penalty``, ``user``, ...); a name outside the schema is refused, and so is a
field this server cannot honour set to anything but its default (``n`` > 1, a penalty, ``tools``, ...:
``unsupported()`` names it). Types are strict (no "5" for 5). ``ApiError(status, message, param)`` is the
one error every endpoint raises (``code``: OpenAI's machine-readable one, e.g. ``model_not_found``);
``error_body`` is OpenAI's ``{"error": {...}}``.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = Union[StrictInt, StrictFloat]
MAX_STOP = 4  # OpenAI's limit on stop strings


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             413: "invalid_request_error", 429: "rate_limit_error",
                             503: "service_unavailable"}.get(status, "server_error")


def error_body(status: int, message: str, param: str | None = None, kind: str | None = None,
               code: str | None = None) -> dict:
    e = ApiError(status, message, param, kind)
    return {"error": {"message": message, "type": e.kind, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: StrictStr | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    max_tokens: StrictInt | None = None
    n: StrictInt | None = None
    presence_penalty: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool | None = None
    stream_options: dict[str, Any] | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    user: StrictStr | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for each field set to a value this server cannot honour."""
        out = []
        if self.n not in (None, 1):
            out.append(("n", "n > 1 is not supported: send one request per completion"))
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0):
                out.append((name, f"{name} is not supported (only 0)"))
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias is not supported"))
        return out


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] | None = None
    best_of: StrictInt | None = None
    echo: StrictBool | None = None
    logprobs: StrictInt | None = None
    suffix: StrictStr | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.best_of not in (None, 1):
            out.append(("best_of", "best_of > 1 is not supported"))
        if self.echo:
            out.append(("echo", "echo is not supported"))
        if self.suffix:
            out.append(("suffix", "suffix (insertion) is not supported"))
        return out


class ChatRequest(_Request):
    messages: list[dict[str, Any]]
    audio: dict[str, Any] | None = None
    function_call: StrictStr | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    logprobs: StrictBool | None = None
    max_completion_tokens: StrictInt | None = None
    metadata: dict[str, Any] | None = None
    modalities: list[StrictStr] | None = None
    parallel_tool_calls: StrictBool | None = None
    prediction: dict[str, Any] | None = None
    prompt_cache_key: StrictStr | None = None
    reasoning_effort: StrictStr | None = None
    response_format: dict[str, Any] | None = None
    safety_identifier: StrictStr | None = None
    service_tier: StrictStr | None = None
    store: StrictBool | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    top_logprobs: StrictInt | None = None
    verbosity: StrictStr | None = None
    web_search_options: dict[str, Any] | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.tools or self.functions:
            out.append(("tools", "tools and functions are not supported"))
        if self.audio is not None or (self.modalities and self.modalities != ["text"]):
            out.append(("modalities", "only text output is supported"))
        if self.response_format and self.response_format.get("type", "text") != "text":
            out.append(("response_format", "only response_format {\"type\": \"text\"} is supported"))
        if self.prediction is not None:
            out.append(("prediction", "predicted outputs are not supported"))
        return out


ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def message_text(i: int, message: dict) -> dict:
    """One chat message as the template sees it ({"role", "content": str}); ApiError when malformed."""
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                       f"messages[{i}].role")
    if isinstance(content, list):  # content parts: text only
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               f"messages[{i}].content")
            parts.append(part["text"])
        content = "".join(parts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                       f"messages[{i}].content")
    return {**message, "role": role, "content": content}


class Sampling(BaseModel):
    """What a request asks of the engine, checked (the HTTP side builds it; the engine trusts it)."""

    max_tokens: int
    temperature: float = Field(0.0)
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = []
    logprobs: int | None = None
    stream: bool = False
    include_usage: bool = False
    kind: Literal["completion", "chat"] = "completion"
