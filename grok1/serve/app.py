"""The FastAPI app: routes, API key, body limit, readiness and the OpenAI error shape.

Routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models` (these need the API key when one
is set), `/tokenize`, `/detokenize`, `/tokenizer_info` (at the root, as lm-evaluation-harness
looks for them), `/health` and `/metrics`. Until the model is loaded and compiled every route but
`/health` and `/metrics` answers 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import hmac
import time

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from grok1.serve import chat, completions
from grok1.serve.generation import JSONResponse
from grok1.serve.metrics import Metrics
from grok1.serve.protocol import (
    APIError,
    DetokenizeRequest,
    TokenizeRequest,
    bad_request,
    parse_json,
    unavailable,
    validate,
)

DEFAULT_MAX_BODY_BYTES = 8 << 20


class ServerState:
    """What the routes share: settings, the engine once ready, and the metrics."""

    def __init__(
        self,
        served_model_name: str,
        *,
        api_key: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        chat_template=None,
    ):
        self.served_model_name = served_model_name
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.chat_template = chat_template
        self.phase = "loading"  # "loading" -> "compiling" -> "ready"
        self.engine = None
        self.tokenizer = None
        self.max_queue = 0
        self.created = int(time.time())
        self.metrics = Metrics()

    def set_ready(self, engine, tokenizer) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.max_queue = engine.stats()["max_queue"]
        self.phase = "ready"

    def require_ready(self) -> None:
        if self.phase != "ready":
            raise unavailable(f"the model is {self.phase}; retry shortly", self.phase, 5)

    def check_capacity(self, n_requests: int) -> None:
        """A request with more sequences than the queue holds could never be admitted."""
        if n_requests > self.max_queue:
            raise bad_request(
                f"this request asks for {n_requests} sequences (prompts x n); the "
                f"server queues at most {self.max_queue}",
                "n",
            )

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip(), self.api_key):
            raise APIError(
                401,
                "missing or wrong API key: send the header 'Authorization: "
                "Bearer KEY' with the server's --api-key",
                type="authentication_error",
                code="invalid_api_key",
            )


async def read_json(request: Request, limit: int) -> dict:
    """The request's JSON object, refusing bodies over `limit` bytes (413) before parsing."""
    too_large = APIError(
        413,
        f"the request body exceeds the server's limit of {limit} bytes (--max-body-bytes)",
        code="request_too_large",
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise bad_request("the client disconnected while sending the body") from None
    return parse_json(b"".join(chunks))


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="grok1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    _add_error_handlers(app)

    def authorized(request: Request) -> None:
        state.authorize(request)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    async def body_of(request: Request) -> dict:
        state.require_ready()
        return await read_json(request, state.max_body_bytes)

    @v1.post("/completions")
    async def create_completion(request: Request):
        return await completions.create(state, await body_of(request), request.receive)

    @v1.post("/chat/completions")
    async def create_chat_completion(request: Request):
        return await chat.create(state, await body_of(request), request.receive)

    @v1.get("/models")
    async def list_models():
        state.require_ready()
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    @v1.get("/models/{name}")
    async def get_model(name: str):
        state.require_ready()
        if name != state.served_model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves "
                f"{state.served_model_name!r}",
                code="model_not_found",
            )
        return JSONResponse(_model_card(state))

    app.include_router(v1)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = validate(TokenizeRequest, await body_of(request))
        tok = _tokenizer(state)
        ids = tok.encode_with_special(req.prompt)
        if req.add_special_tokens:
            ids = [tok.bos_id, *ids]
        return JSONResponse(
            {"tokens": ids, "count": len(ids), "max_model_len": state.engine.capacity}
        )

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = validate(DetokenizeRequest, await body_of(request))
        tok = _tokenizer(state)
        bad = [t for t in req.tokens if not 0 <= t < tok.vocab_size]
        if bad:
            raise bad_request(
                f"token id {bad[0]} is outside the vocabulary [0, {tok.vocab_size})", "tokens"
            )
        return JSONResponse({"prompt": tok.decode(req.tokens)})

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        state.require_ready()
        return JSONResponse(_tokenizer_info(state, _tokenizer(state)))

    @app.get("/health")
    async def health():
        alive = state.engine is None or getattr(state.engine, "alive", True)
        status = state.phase if alive else "dead"
        if status == "ready":
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics():
        engine = state.engine
        stats = None if engine is None else await asyncio.to_thread(engine.stats)
        body = state.metrics.render(stats, state.phase == "ready")
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    routes = {
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/tokenizer_info",
        "/health",
        "/metrics",
    }
    return _CountResponses(app, state.metrics, routes)


def _model_card(state: ServerState) -> dict:
    return {
        "id": state.served_model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "grok1",
        "max_model_len": state.engine.capacity,
    }


def _tokenizer(state: ServerState):
    if state.tokenizer is None:
        raise APIError(
            404,
            "this model has no tokenizer (its checkpoint came without "
            "tokenizer.model): send token ids",
            code="no_tokenizer",
        )
    return state.tokenizer


def _tokenizer_info(state: ServerState, tok) -> dict:
    pieces = {i: p for p, i in tok.special_pieces.items()}
    info = {
        "tokenizer_class": "SentencePiece",
        "vocab_size": tok.vocab_size,
        "model_max_length": state.engine.capacity,
        "add_bos_token": False,
    }
    for name, token_id in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
        info[f"{name}_token"] = pieces.get(token_id)
        info[f"{name}_token_id"] = token_id if token_id in pieces else None
    if state.chat_template is not None:
        info["chat_template"] = state.chat_template.source
    return info


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": str(e)}
        param = ".".join(str(x) for x in first["loc"][1:]) or None
        return await api_error(request, bad_request(f"{param or 'body'}: {first['msg']}", param))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        where = f"{request.method} {request.url.path}"
        if e.status_code == 404:
            message = f"no route {where} (the API is under /v1: /v1/completions, /v1/models)"
        else:
            message = f"{where}: {e.detail}"
        code = "not_found" if e.status_code == 404 else None
        return await api_error(request, APIError(e.status_code, message, code=code))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        error = APIError(500, f"internal error: {type(e).__name__}: {e}", type="internal_error")
        return await api_error(request, error)


class _CountResponses:
    """ASGI wrapper that counts HTTP responses by route and status code."""

    def __init__(self, app, metrics: Metrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes
        self.state = app.state  # tests reach the ServerState as app.state.server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.http.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
