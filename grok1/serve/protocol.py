"""The OpenAI request bodies the server accepts, their validation, and its errors.

Every mistake in a request becomes an `APIError` (HTTP 400 unless said otherwise) in OpenAI's
shape `{"error": {"message", "type", "param", "code"}}`, never a 500. Unknown fields are
ignored, as OpenAI does; fields we cannot honour (`frequency_penalty`, `logit_bias`, ...) are
refused rather than silently ignored.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_N = 128  # choices per prompt


class APIError(Exception):
    """An error answered to the client as `{"error": {...}}` with HTTP `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def unavailable(message: str, code: str, retry_after_s: int = 1) -> APIError:
    return APIError(
        503,
        message,
        type="service_unavailable",
        code=code,
        headers={"Retry-After": str(retry_after_s)},
    )


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> dict:
    """The JSON object of a request body (400 for anything else)."""
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(obj).__name__}")
    return obj


def validate(model: type[BaseModel], obj: dict):
    """`model` filled from `obj`; the first validation error as a 400 naming the field."""
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        # union members appear in the location as type names ("str", "list[int]"): drop them
        loc = [str(x) for x in err["loc"] if isinstance(x, int) or x in obj or "[" not in str(x)]
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        msg = err["msg"].removeprefix("Value error, ").removeprefix(f"{where} ")
        got = "" if err["type"] == "missing" else f" (got {json.dumps(err.get('input'))[:80]})"
        raise bad_request(f"{where}: {msg}{got}", param) from None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


def _finite(default, **kw):
    return Field(default, allow_inf_nan=False, **kw)


class StreamOptions(_Body):
    include_usage: bool = False


class Sampling(_Body):
    """The fields that completions and chat completions share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = _finite(None, ge=0)
    top_p: float | None = _finite(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 and 0: off (vLLM and grok1 spellings)
    min_p: float | None = _finite(None, ge=0, le=1)
    repetition_penalty: float | None = _finite(None, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    # OpenAI fields we cannot honour: refused unless left at their neutral value
    frequency_penalty: float | None = _finite(None)
    presence_penalty: float | None = _finite(None)
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v):
        for s in [v] if isinstance(v, str) else v or []:
            if not s:
                raise ValueError("stop strings must be non-empty")
        return v

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def refuse_unsupported(self) -> None:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported; use repetition_penalty", name)
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")
        if self.best_of not in (None, self.n):
            raise bad_request(f"best_of must equal n ({self.n}) or be left out", "best_of")


class CompletionRequest(Sampling):
    prompt: Any = None
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, v):
        return prompt_list(v)


class ChatMessage(_Body):
    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The content as text (the text parts of a list, joined)."""
        if not isinstance(self.content, list):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(
                    f"only text content parts are supported, got {part.get('type')!r}", "messages"
                )
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True


class TokenizeRequest(_Body):
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


_PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"


def _is_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def prompt_list(v) -> list[str | list[int]]:
    """The prompts of a `prompt` field, each a non-empty string or a non-empty id list."""
    if v is None:
        raise ValueError(f"is required: {_PROMPT_SHAPES}")
    single = isinstance(v, str) or (isinstance(v, list) and v and all(_is_id(x) for x in v))
    if single:
        v = [v]
    if not isinstance(v, list) or not v:
        raise ValueError(f"must be {_PROMPT_SHAPES}, and not empty")
    for i, p in enumerate(v):
        which = "" if single else f"element {i} "
        ok = isinstance(p, str) or (isinstance(p, list) and all(_is_id(x) for x in p))
        if not ok:
            raise ValueError(f"{which}must be {_PROMPT_SHAPES}")
        if not p:
            raise ValueError(f"{which}is empty: give at least one token or character")
        if isinstance(p, list) and min(p) < 0:
            raise ValueError(f"{which}has a negative token id {min(p)}")
    return v
