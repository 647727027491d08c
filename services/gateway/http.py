"""OpenAI-compatible HTTP on FastAPI (Starlette) served by uvicorn, over the gateway's generation
path (services/gateway/server.py: Gateway.generate).

Routes: POST /v1/chat/completions, POST /v1/completions (both streaming as server-sent events),
GET /v1/models, GET /v1/models/{id}, POST /tokenize, POST /detokenize, GET /health (503 while no
target is ready), GET /healthz (process liveness), GET /metrics (Prometheus text).

Every error is an OpenAI error object {"error": {"message", "type", "param", "code"}} with a
4xx/5xx status; a parameter we do not implement is refused with 400 naming it, never ignored.
Limits: request bodies over `max_body_bytes` get 413, bodies that do not arrive within
`body_timeout_s` get 408, and uvicorn's `limit_concurrency` answers 503 beyond `max_connections`.
`api_keys` (non-empty) requires "Authorization: Bearer <key>" on every route but the health
and metrics probes.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
import uuid
from typing import Any, Literal

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Match

from ssd.config import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_REPETITION_PENALTY, Mode

from ..protos import pb
from .. import telemetry as tm
from .server import MAX_TOKENS_LIMIT, Gateway, GenerateError

MAX_BODY_BYTES = 4 << 20
BODY_TIMEOUT_S = 30.0
# request headers: beyond any of these the answer is 431 (Request Header Fields Too Large)
MAX_HEADER_COUNT = 100
MAX_HEADER_LINE_BYTES = 8 << 10  # one field, name and value
MAX_HEADERS_BYTES = 32 << 10  # all fields together
INT64 = (-(1 << 63), (1 << 63) - 1)
INT32_MAX = (1 << 31) - 1  # the largest value of the proto's int32 fields (top_k, ...)

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 400,  # a prompt over the context: the request is too large
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
}
_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
         409: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
         422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error",
         504: "timeout_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                      "param": param, "code": code}}


def _error(status: int, message: str, param: str | None = None, code: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


# ---- request schema ------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return _utf8(self.content, "messages")
        parts = []
        for p in self.content:  # content parts: only text ones are understood
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ApiError(400, f"content part of type {p.get('type')!r} is not supported (text only)", "messages")
            parts.append(_utf8(p["text"], "messages"))
        return "".join(parts)


# parameters that are part of the OpenAI surface but that this server does not implement: a
# request that sets one (to anything but its neutral value) is refused, naming it
_UNSUPPORTED = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "response_format": (None, {"type": "text"}), "echo": (None, False),
    "suffix": (None, ""), "best_of": (None, 1), "parallel_tool_calls": (None,), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,),
    "web_search_options": (None,),
    "store": (None, False), "metadata": (None, {}), "service_tier": (None, "auto", "default"),
}


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None  # extension (vLLM)
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: StrictInt | None = None
    ignore_eos: StrictBool = False  # extension (vLLM)
    mode: Mode | None = None  # extension: how this request is decoded
    user: str | None = None  # an end-user id for the caller's own bookkeeping: accepted, not used (README)
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    # adjustments of the target's logits, the same in AR, SD and SSD (ssd/sampling.py)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # extension (vLLM)
    logit_bias: dict[str, float] | None = None
    min_tokens: StrictInt | None = None  # extension (vLLM)
    # accepted only at their neutral values (see _UNSUPPORTED)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

    @field_validator("seed")
    @classmethod
    def _seed(cls, v):
        if v is not None and not INT64[0] <= v <= INT64[1]:
            raise ValueError("seed must fit in a signed 64-bit integer")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list):
            if len(v) > 4:
                raise ValueError("at most 4 stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must be non-empty")
        elif v == "":
            raise ValueError("stop sequences must be non-empty")
        return v

    def refuse_unsupported(self) -> None:
        for name, neutral in _UNSUPPORTED.items():
            v = getattr(self, name, None)
            if not any(v == x and type(v) is type(x) or v is x for x in neutral):
                raise ApiError(400, f"{name} is not supported by this server", name, "unsupported_parameter")
        if self.n not in (None, 1):
            raise ApiError(400, "only n = 1 is supported", "n", "unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None

    def alternatives(self) -> int | None:
        """SamplingParams.logprobs: None (no logprobs) or the alternatives per token."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs: true", "top_logprobs")
        if not self.logprobs:
            return None
        return _in_range(self.top_logprobs or 0, 0, MAX_LOGPROBS, "top_logprobs")


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: StrictInt | None = None  # legacy: the number of alternatives per token

    def alternatives(self) -> int | None:
        return None if self.logprobs is None else _in_range(self.logprobs, 0, MAX_LOGPROBS, "logprobs")


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[StrictInt] = Field(min_length=0)


# ---- stop strings -------------------------------------------------------------------------------
class StopScanner:
    """Cuts the streamed text before the first stop string, wherever token boundaries fall:
    push(text) returns what may be emitted now (holding back a tail that could still begin a
    stop string) and whether a stop string was found; flush() returns the held tail at the end."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buf = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.buf += text
        if not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf, self.stopped = self.buf[:min(hits)], "", True
            return out, True
        cut = max(len(self.buf) - self.hold, 0)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


# ---- the app --------------------------------------------------------------------------------------
class _BodyLimit:
    """ASGI middleware: 413 for a body over max_bytes (declared or streamed), 408 when it does not
    arrive within timeout_s."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                n = -1
            if n < 0:
                return await _error(400, "Content-Length must be a non-negative integer")(scope, receive, send)
            if n > self.max_bytes:
                return await _error(413, f"request body over {self.max_bytes} bytes")(scope, receive, send)
        # the whole body first (it is small), within the size and time limits, then replayed
        body, started = [], time.monotonic()
        seen, more = 0, scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            left = self.timeout_s - (time.monotonic() - started)
            try:
                msg = await asyncio.wait_for(receive(), timeout=max(left, 0.001))
            except asyncio.TimeoutError:
                return await _error(408, f"the request body did not arrive within {self.timeout_s:g} s")(scope, receive, send)
            if msg["type"] != "http.request":  # the client went away
                return
            body.append(msg.get("body", b""))
            seen += len(body[-1])
            if seen > self.max_bytes:
                return await _error(413, f"request body over {self.max_bytes} bytes")(scope, receive, send)
            more = msg.get("more_body", False)
        pending = [{"type": "http.request", "body": b"".join(body), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()  # then: disconnect notices

        await self.app(scope, replay, send)


class _HeaderLimits:
    """ASGI middleware: 431 for a request with more than max_count header fields, a field (name
    and value) over max_line bytes, or over max_total bytes of fields in all."""

    def __init__(self, app, max_count: int, max_line: int, max_total: int):
        self.app, self.max_count, self.max_line, self.max_total = app, max_count, max_line, max_total

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = scope.get("headers") or []
            sizes = [len(k) + len(v) for k, v in headers]
            why = (f"{len(headers)} header fields; at most {self.max_count}" if len(headers) > self.max_count
                   else f"a header field of {max(sizes)} bytes; at most {self.max_line}" if sizes and max(sizes) > self.max_line
                   else f"{sum(sizes)} bytes of header fields; at most {self.max_total}" if sum(sizes) > self.max_total
                   else None)
            if why:
                return await _error(431, f"request header fields too large: {why}", None,
                                    "request_header_fields_too_large")(scope, receive, send)
        return await self.app(scope, receive, send)


class _ServerSpans:
    """ASGI middleware: the request's one SERVER span, a child of the caller's W3C trace context
    (traceparent header), with the HTTP conventions' attributes and the response's status code;
    it stays open until the last byte of the response (a stream's too). The gateway's
    `ssd.request` span is made inside it (scope["ssd.trace_context"])."""

    def __init__(self, app, tracer, routes):
        self.app, self.tracer, self.routes = app, tracer, routes  # routes: the app's, for http.route

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers") or []}
        path, method = scope.get("path", ""), scope.get("method", "")
        route = next((r.path for r in self.routes if r.matches(scope)[0] == Match.FULL), None)
        attrs = {tm.HTTP_METHOD: method, "url.path": path, "url.scheme": scope.get("scheme", "http"),
                 "network.protocol.version": scope.get("http_version", "")}
        if route:
            attrs[tm.HTTP_ROUTE] = route
        if scope.get("query_string"):
            attrs["url.query"] = scope["query_string"].decode("latin-1")
        if scope.get("server"):
            attrs[tm.SERVER_ADDRESS], attrs[tm.SERVER_PORT] = scope["server"][0], scope["server"][1]
        if scope.get("client"):
            attrs["client.address"] = scope["client"][0]
        if "user-agent" in headers:
            attrs["user_agent.original"] = headers["user-agent"]
        span = self.tracer.start_span(f"{method} {route}" if route else method, context=tm.extract_headers(headers),
                                      kind=SpanKind.SERVER, attributes=attrs)
        scope["ssd.trace_context"] = set_span_in_context(span)
        ended = []

        def end():
            if not ended:
                ended.append(True)
                span.end()

        async def traced_send(message):
            if message["type"] == "http.response.start":
                status = message["status"]
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                    span.set_attribute("error.type", str(status))
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                end()

        try:
            await self.app(scope, receive, traced_send)
        except BaseException as e:
            span.set_status(Status(StatusCode.ERROR, type(e).__name__))
            span.set_attribute("error.type", type(e).__qualname__)
            raise
        finally:
            end()  # when no response (or not all of it) was sent


class _Auth:
    """ASGI middleware: 401 unless "Authorization: Bearer <key>" names one of keys (when there
    are any); open_paths (probes) and CORS preflights pass."""

    def __init__(self, app, keys: frozenset, open_paths: set[str]):
        self.app, self.keys, self.open_paths = app, keys, open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.keys and scope["path"] not in self.open_paths and scope["method"] != "OPTIONS":
            auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or token.strip() not in self.keys:
                return await _error(401, "missing or invalid API key (Authorization: Bearer <key>)", None,
                                    "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(gw: Gateway, api_keys: set[str] | frozenset = frozenset(), cors_origins: list[str] | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    # FastAPI's own telemetry (newer releases) would add a second SERVER span per request and
    # spans per dependency: _ServerSpans makes the one SERVER span instead
    native = {"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}} \
        if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {}
    app = FastAPI(title="ssd", docs_url=None, redoc_url=None, openapi_url=None, **native)
    keys = frozenset(api_keys)
    open_paths = {"/health", "/healthz", "/metrics"}
    api = _Api(gw)
    _add_error_handlers(app)
    _add_info_routes(app, api)
    _add_completion_routes(app, api)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "traceparent"], allow_credentials=False)
    # pure ASGI wrappers (not @app.middleware: that wrapper hides a client's disconnect from the
    # endpoint, and a request nobody reads any more would go on generating)
    limited = _HeaderLimits(_Auth(_BodyLimit(app, max_body_bytes, body_timeout_s), keys, open_paths),
                            MAX_HEADER_COUNT, MAX_HEADER_LINE_BYTES, MAX_HEADERS_BYTES)
    return _ServerSpans(limited, gw.tracer, app.routes)


def _add_error_handlers(app: FastAPI) -> None:
    """OpenAI-shaped error bodies for every failure: ours, validation, routing, the target's."""
    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error(e.status, str(e), e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if err.get("type") == "extra_forbidden":
            return _error(400, f"unrecognized request argument supplied: {param}", param, "unknown_parameter")
        if err.get("type") in ("json_invalid", "json_type"):
            return _error(400, f"malformed JSON body: {err.get('msg', '')}", None, "invalid_json")
        return _error(400, f"{param or 'body'}: {err.get('msg', 'invalid value')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        msg = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on {request.url.path}"}
        return _error(e.status_code, msg.get(e.status_code, str(e.detail)),
                      headers=getattr(e, "headers", None))

    @app.exception_handler(GenerateError)
    async def _generate_error(request, e: GenerateError):
        if e.retry_after_ms is not None:  # the target's queue is full: admission control
            return _error(429, str(e), None, "queue_full",
                          headers={"Retry-After": str(max(1, -(-e.retry_after_ms // 1000)))})
        status = _STATUS.get(e.code, 500)
        code = "model_not_found" if status == 404 else e.code.name.lower()
        return _error(status, str(e), None, code)


def _add_info_routes(app: FastAPI, api: _Api) -> None:
    """Models, health, metrics, tokenize and detokenize."""
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [api.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        api.check_model(model_id)
        return api.model_card()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/health")
    async def health():
        ready = await run_in_threadpool(api.gw.ready)
        return JSONResponse({"status": "ok" if ready else "no target ready"}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics():
        if api.gw.metrics is None:
            return Response("", media_type="text/plain")
        body, ctype = api.gw.metrics.render()
        return Response(body, media_type=ctype)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        api.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give exactly one of prompt and messages", "prompt")
        if req.prompt is not None:
            ids = api.gw.tokenizer.encode(_utf8(req.prompt, "prompt"), add_special_tokens=req.add_special_tokens)
        else:
            ids = api.gw.tokenizer.apply_chat_template([{"role": _role(m.role), "content": m.text()} for m in req.messages])
        return {"tokens": ids, "count": len(ids), "max_model_len": api.gw.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        api.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < api.gw.tokenizer.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} outside the vocabulary [0, {api.gw.tokenizer.vocab_size})", "tokens")
        return {"prompt": api.gw.tokenizer.decode(req.tokens, skip_special_tokens=False)}


def _add_completion_routes(app: FastAPI, api: _Api) -> None:
    """/v1/chat/completions and /v1/completions: each request's own checks, then api.run."""
    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        req.refuse_unsupported()
        if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens disagree", "max_completion_tokens")
        if not req.messages:
            raise ApiError(400, "messages must not be empty", "messages")
        g = pb.GenerateRequest(messages=pb.ChatMessages(messages=[
            pb.ChatMessage(role=_role(m.role), content=m.text()) for m in req.messages]))
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return await api.run(req, g, request, chat=True, max_tokens=limit, default_max=None)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        req.refuse_unsupported()
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], list):
            if len(p) != 1:
                raise ApiError(400, "one prompt per request (a batch of prompts is not supported)", "prompt")
            p = p[0]
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                raise ApiError(400, "one prompt per request (a batch of prompts is not supported)", "prompt")
            p = p[0]
        if isinstance(p, list):
            if not p:
                raise ApiError(400, "prompt is empty", "prompt")
            bad = [t for t in p if not 0 <= t < api.gw.tokenizer.vocab_size]
            if bad:
                raise ApiError(400, f"prompt token id {bad[0]} outside the vocabulary [0, {api.gw.tokenizer.vocab_size})", "prompt")
            g = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=p))
        else:
            g = pb.GenerateRequest(prompt=_utf8(p, "prompt"))
        return await api.run(req, g, request, chat=False, max_tokens=req.max_tokens, default_max=16)


class _Api:
    """The gateway as the OpenAI-compatible routes use it: the model check and card, and one
    completion request run to its JSON body or its server-sent events."""

    def __init__(self, gw: Gateway):
        self.gw, self.created = gw, int(time.time())

    def check_model(self, model: str | None) -> None:
        if model and model != self.gw.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; served: {self.gw.model_name!r}", "model",
                           "model_not_found")

    def model_card(self) -> dict:
        return {"id": self.gw.model_name, "object": "model", "created": self.created, "owned_by": "ssd",
                "max_model_len": self.gw.max_model_len, "draft": self.gw.draft_description}

    async def run(self, req: _Common, g, request: Request, chat: bool, max_tokens: int | None, default_max: int | None):
        self.check_model(req.model)
        g.model = req.model or ""
        g.mode = req.mode.value if req.mode else ""
        g.request_id = uuid.uuid4().hex
        s = g.sampling
        s.temperature = 1.0 if req.temperature is None else _number(req.temperature, "temperature")
        s.top_p = 1.0 if req.top_p is None else _number(req.top_p, "top_p")
        if req.top_p is not None and not 0 < req.top_p <= 1:
            raise ApiError(400, "top_p must be in (0, 1]", "top_p")
        s.top_k = 0 if req.top_k is None else _in_range(req.top_k, 0, INT32_MAX, "top_k")  # >= the vocabulary: off
        s.ignore_eos = req.ignore_eos
        _set_adjustments(req, s, self.gw.tokenizer.vocab_size)
        alternatives = req.alternatives()
        if alternatives is not None:
            s.logprobs = alternatives
        if req.seed is not None:
            s.seed = req.seed
        if max_tokens is not None:
            if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
                raise ApiError(400, f"max_tokens must be in [1, {MAX_TOKENS_LIMIT}]",
                               "max_completion_tokens" if chat and req.max_tokens is None else "max_tokens")
            s.max_tokens = max_tokens
        else:  # chat: up to the context; legacy completions: 16, as OpenAI
            s.max_tokens = default_max or 0  # 0: the gateway fills in "the rest of the context"
        if s.max_tokens and s.min_tokens > s.max_tokens:
            raise ApiError(400, f"min_tokens ({s.min_tokens}) is over max_tokens ({s.max_tokens})", "min_tokens")
        gen = self.gw.generate(g, parent_ctx=request.scope.get("ssd.trace_context"), fill_max_tokens=True,
                          http_route=request.url.path)
        first = await run_in_threadpool(_first, gen)  # validation errors surface here, before any response
        rid = ("chatcmpl-" if chat else "cmpl-") + first.request_id
        now = int(time.time())
        scanner = StopScanner(req.stops())
        lps = _Logprobs(self.gw.tokenizer, chat) if alternatives is not None else None
        if not req.stream:
            return await self.collect(gen, first, rid, now, chat, scanner, request, lps)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(self.sse(gen, first, rid, now, chat, scanner, include_usage, lps),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def collect(self, gen, first, rid, now, chat, scanner: StopScanner, request: Request, lps: "_Logprobs | None"):
        """Non-streaming: the whole answer; a client that hangs up aborts the request."""
        done = threading.Event()

        def consume():
            parts, last, produced, finish = [], first, 0, None
            for r in _chain(first, gen):
                produced += len(r.token_ids)
                if lps is not None:
                    lps.add(r)
                out, hit = scanner.push(r.text)
                parts.append(out)
                last = r
                if hit:
                    finish = "stop"
                    _stop(gen, self.gw, first.request_id)  # no work for text nobody reads
                    break
                if done.is_set():
                    _stop(gen, self.gw, first.request_id)
                    break
            if finish is None:
                parts.append(scanner.flush())
                finish = _finish(last.finish_reason)
            return "".join(parts), finish, last, produced

        task = asyncio.ensure_future(run_in_threadpool(consume))
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                done.set()  # the consumer closes the stream at its next message
                self.gw.abort(first.request_id)
        text, finish, last, produced = await task
        obj = "chat.completion" if chat else "text_completion"
        return {"id": rid, "object": obj, "created": now, "model": self.gw.model_name,
                "choices": [_choice(text, finish, chat, False, logprobs=lps and lps.total())], "usage": _usage(last, produced),
                "system_fingerprint": self.gw.draft_description or None}

    async def sse(self, gen, first, rid, now, chat, scanner: StopScanner, include_usage: bool, lps: "_Logprobs | None"):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choices, extra=None) -> bytes:
            e = {"id": rid, "object": obj, "created": now, "model": self.gw.model_name, "choices": choices}
            if include_usage:
                e["usage"] = None
            if extra:
                e.update(extra)
            return f"data: {json.dumps(e)}\n\n".encode()

        produced, last, finish = 0, first, None
        stream = iterate_in_threadpool(_chain(first, gen))
        try:
            if chat:  # the role comes first, alone, as OpenAI sends it
                yield event([_choice("", None, True, True, first=True)])
            async for r in stream:
                produced += len(r.token_ids)
                last = r
                out, hit = scanner.push(r.text)
                chunk_lps = lps.add(r) if lps is not None else None
                if out or chunk_lps:  # logprobs of tokens whose text is still held back come now
                    yield event([_choice(out, None, chat, True, logprobs=chunk_lps)])
                if hit:
                    finish = "stop"
                    break
            if finish is None:
                tail = scanner.flush()
                if tail:
                    yield event([_choice(tail, None, chat, True)])
                finish = _finish(last.finish_reason)
            yield event([_choice("", finish, chat, True)])
            if include_usage:
                yield event([], {"usage": _usage(last, produced)})
            yield b"data: [DONE]\n\n"
        except GenerateError as e:
            status = _STATUS.get(e.code, 500)
            yield f"data: {json.dumps(error_body(status, str(e), None, e.code.name.lower()))}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            _stop(gen, self.gw, first.request_id)  # a client that left (or a stop string) cancels the target call


def _choice(text: str, finish: str | None, chat: bool, delta: bool, first: bool = False, logprobs=None) -> dict:
    c: dict = {"index": 0, "finish_reason": finish, "logprobs": logprobs}
    if chat:
        if delta:
            c["delta"] = ({"role": "assistant", "content": text} if first else {"content": text}) if (text or first) else {}
        else:
            c["message"] = {"role": "assistant", "content": text}
    else:
        c["text"] = text
    return c


def _usage(resp, produced: int) -> dict:
    p = resp.usage.prompt_tokens
    return {"prompt_tokens": p, "completion_tokens": produced, "total_tokens": p + produced}


def _utf8(text: str, param: str) -> str:
    """Text that can be encoded (JSON allows lone surrogates like "\\ud800"; UTF-8 does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{param} is not valid Unicode text (a lone surrogate?)", param) from None
    return text


def _in_range(v, lo, hi, name: str):
    if not lo <= v <= hi:
        raise ApiError(400, f"{name} must be in [{lo}, {hi}], got {v}", name)
    return v


def _set_adjustments(req: "_Common", s, vocab_size: int) -> None:
    """Penalties, logit_bias and min_tokens into the request's SamplingParams message, each
    checked here so a bad one is refused naming it."""
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(req, name)
        if v is not None:
            setattr(s, name, _in_range(_number(v, name), -2.0, 2.0, name))
    if req.repetition_penalty is not None:
        r = _number(req.repetition_penalty, "repetition_penalty")
        if not 0 < r <= MAX_REPETITION_PENALTY:
            raise ApiError(400, f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}]", "repetition_penalty")
        s.repetition_penalty = r
    if req.logit_bias:
        if len(req.logit_bias) > MAX_LOGIT_BIAS:
            raise ApiError(400, f"logit_bias has more than {MAX_LOGIT_BIAS} entries", "logit_bias")
        for key, bias in req.logit_bias.items():
            if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size:
                raise ApiError(400, f"logit_bias key {key!r} is not a token id in [0, {vocab_size})", "logit_bias")
            s.logit_bias[int(key)] = _in_range(_number(bias, "logit_bias"), -100.0, 100.0, "logit_bias")
    if req.min_tokens is not None:
        s.min_tokens = _in_range(req.min_tokens, 0, MAX_TOKENS_LIMIT, "min_tokens")


class _Logprobs:
    """OpenAI logprobs objects from the GenerateResponse's TokenLogprob entries: chat
    {"content": [{token, logprob, bytes, top_logprobs}]}; legacy completions {tokens,
    token_logprobs, top_logprobs (the chosen token and its alternatives), text_offset (from the
    start of the generated text)}. `add` takes each response in order and returns the object
    for its tokens alone (a stream chunk's); `total` the object for all of them."""

    def __init__(self, tokenizer, chat: bool):
        self.tok, self.chat = tokenizer, chat
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=False)
        self.offset = 0
        self.all: list = []

    def _item(self, token_id: int, logprob: float) -> dict:
        return {"token": self.tok.token_text(token_id), "logprob": logprob, "bytes": list(self.tok.token_bytes(token_id))}

    def add(self, resp) -> dict | None:
        if not resp.logprobs:
            return None
        items = []
        for t, e in zip(resp.token_ids, resp.logprobs):
            if self.chat:
                item = self._item(t, e.logprob)
                item["top_logprobs"] = [self._item(a.token_id, a.logprob) for a in e.top]
            else:
                alts = {self.tok.token_text(a.token_id): a.logprob for a in e.top}
                alts.setdefault(self.tok.token_text(t), e.logprob)
                item = (self.tok.token_text(t), e.logprob, alts, self.offset)
            self.offset += len(self.decoder.push(t))
            items.append(item)
        self.all += items
        return self._obj(items)

    def total(self) -> dict:
        return self._obj(self.all)

    def _obj(self, items: list) -> dict:
        if self.chat:
            return {"content": items, "refusal": None}
        return {"tokens": [i[0] for i in items], "token_logprobs": [i[1] for i in items],
                "top_logprobs": [i[2] for i in items], "text_offset": [i[3] for i in items]}


def _role(role: str) -> str:
    return "system" if role == "developer" else role


def _number(v, name: str) -> float:
    if isinstance(v, bool) or v != v or v in (float("inf"), float("-inf")):
        raise ApiError(400, f"{name} must be a finite number", name)
    return float(v)


def _finish(reason: str) -> str:
    return {"stop": "stop", "length": "length", "abort": "abort"}.get(reason, reason or "stop")


def _first(gen):
    try:
        return next(gen)
    except StopIteration:
        raise GenerateError(grpc.StatusCode.INTERNAL, "the target ended the stream without a response") from None


def _stop(gen, gw: Gateway, request_id: str) -> None:
    """End a generation early from any thread: cancel its target call (which ends a read blocked
    in another thread), then close the generator if no thread is inside it."""
    gw.abort(request_id)
    try:
        gen.close()
    except ValueError:  # still executing in a worker thread: the cancel ends it there
        pass


def _chain(first, rest):
    yield first
    yield from rest


class HttpServer:
    """uvicorn in a background thread (its own event loop): what `ssd serve` and the tests run."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, max_connections: int = 1024,
                 ssl_certfile: str | None = None, ssl_keyfile: str | None = None):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.server_address = self.sock.getsockname()[:2]
        config = uvicorn.Config(app, log_level="warning", access_log=False, limit_concurrency=max_connections,
                                timeout_keep_alive=30, timeout_graceful_shutdown=10, lifespan="off",
                                ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, h11_max_incomplete_event_size=64 << 10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True, name="http")
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            raise RuntimeError("the HTTP server did not start")

    def shutdown(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


def serve_http(gw: Gateway, host: str = "127.0.0.1", port: int = 0, api_keys=frozenset(), cors_origins=None,
               max_connections: int = 1024, ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> HttpServer:
    return HttpServer(create_app(gw, api_keys, cors_origins), host, port, max_connections, ssl_certfile, ssl_keyfile)
