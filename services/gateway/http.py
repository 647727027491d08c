"""OpenAI-compatible HTTP over the gateway's generation path: /v1/completions,
/v1/chat/completions (SSE when "stream": true) and /v1/models. Standard library only."""
from __future__ import annotations

import json
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

from ..protos import pb
from .. import telemetry as tm
from .server import Gateway, GenerateError

MAX_BODY_BYTES = 4 << 20

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _sampling(body: dict, default_max: int):
    def num(name, kind, default):
        v = body.get(name, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v):
            raise HttpError(400, f"{name} must be a{'n integer' if kind is int else ' number'}")
        return kind(v)

    s = pb.SamplingParams(temperature=num("temperature", float, 1.0), top_p=num("top_p", float, 1.0),
                          top_k=num("top_k", int, 0), max_tokens=num("max_tokens", int, default_max))
    if body.get("seed") is not None:
        s.seed = num("seed", int, 0)
    if body.get("n", 1) != 1:
        raise HttpError(400, "only n = 1 is supported")
    return s


def make_handler(gw: Gateway):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet; tracing/metrics are the observability path
            pass

        def _json(self, status: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": {"message": message, "type": HTTPStatus(status).phrase, "code": status}})

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": gw.model_name, "object": "model", "owned_by": "ssd"}]})
            elif self.path == "/healthz":
                self._json(200, {"status": "ok"})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self):
            try:
                route = self.path.rstrip("/")
                if route not in ("/v1/completions", "/v1/chat/completions"):
                    raise HttpError(404, f"no route {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    raise HttpError(413, f"body over {MAX_BODY_BYTES} bytes")
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise HttpError(400, f"malformed JSON: {e}") from None
                if not isinstance(body, dict):
                    raise HttpError(400, "the body must be a JSON object")
                chat = route.endswith("chat/completions")
                req = pb.GenerateRequest(model=body.get("model") or "", sampling=_sampling(body, 256 if chat else 16))
                if chat:
                    msgs = body.get("messages")
                    if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
                        raise HttpError(400, "messages must be a list of {role, content}")
                    req.messages.CopyFrom(pb.ChatMessages(messages=[pb.ChatMessage(role=str(m.get("role", "")), content=m["content"]) for m in msgs]))
                else:
                    prompt = body.get("prompt")
                    if not isinstance(prompt, str):
                        raise HttpError(400, "prompt must be a string")
                    req.prompt = prompt
                self._generate(req, chat, bool(body.get("stream")))
            except HttpError as e:
                self._error(e.status, str(e))
            except GenerateError as e:
                self._error(_HTTP_STATUS.get(e.code, 500), str(e))

        def _generate(self, req, chat: bool, stream: bool) -> None:
            gen = gw.generate(req, parent_ctx=tm.extract_headers(dict(self.headers.items())))
            first = next(gen)  # validation errors surface here, before any header is sent
            created = int(time.time())
            kind = "chat.completion" if chat else "text_completion"
            rid = ("chatcmpl-" if chat else "cmpl-") + first.request_id

            def choice(text: str, finish: str | None, delta: bool):
                c = {"index": 0, "finish_reason": finish or None}
                if chat:
                    c["delta" if delta else "message"] = {"role": "assistant", "content": text}
                else:
                    c["text"] = text
                return c

            if not stream:
                parts, last = [first.text], first
                for r in gen:
                    parts.append(r.text)
                    last = r
                self._json(200, {"id": rid, "object": kind, "created": created, "model": gw.model_name,
                                 "choices": [choice("".join(parts), last.finish_reason, False)],
                                 "usage": {"prompt_tokens": last.usage.prompt_tokens, "completion_tokens": last.usage.completion_tokens,
                                           "total_tokens": last.usage.prompt_tokens + last.usage.completion_tokens}})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            try:
                for r in _chain(first, gen):
                    event = {"id": rid, "object": chunk_kind, "created": created, "model": gw.model_name,
                             "choices": [choice(r.text, r.finish_reason, True)]}
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                gw.abort(first.request_id)  # the client left: free the sequence
            except GenerateError as e:
                self.wfile.write(f"data: {json.dumps({'error': {'message': str(e)}})}\n\n".encode())
            self.close_connection = True

    return Handler


def _chain(first, rest):
    yield first
    yield from rest


def serve_http(gw: Gateway, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    httpd = ThreadingHTTPServer((host, port), make_handler(gw))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True, name="http").start()
    return httpd
