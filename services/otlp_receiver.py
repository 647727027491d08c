"""An in-process OTLP/gRPC trace receiver: what a collector or Jaeger would ingest on port
4317, kept in memory as flat span dicts. Used by the tests and by `ssd trace --listen`.

    rx = OTLPReceiver(port=0).start()
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = rx.endpoint      # http://127.0.0.1:PORT
    ...
    rx.wait_for(lambda spans: any(s["name"] == "ssd.verify" for s in spans), timeout=10)
    rx.save_json("spans.json"); rx.stop()

A span dict: trace_id (32 hex), span_id (16 hex), parent_span_id (16 hex or ""), name, kind,
service (the resource's service.name), start_ns, end_ns, attributes (decoded values).
`load_spans` reads that JSON list back, and also OTLP/JSON files ({"resourceSpans": ...}, as
a collector's file exporter writes) and Jaeger UI "Download JSON" files ({"data": [...]}).
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def decode_any_value(v) -> Any:
    """An OTLP AnyValue protobuf as a plain Python value."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [decode_any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: decode_any_value(kv.value) for kv in v.kvlist_value.values}
    if which == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, which)


def _attrs(kvs) -> dict:
    return {kv.key: decode_any_value(kv.value) for kv in kvs}


def flatten_request(req: trace_service_pb2.ExportTraceServiceRequest) -> list[dict]:
    out = []
    for rs in req.resource_spans:
        res = _attrs(rs.resource.attributes)
        service = str(res.get("service.name", ""))
        for ss in rs.scope_spans:
            for sp in ss.spans:
                out.append({
                    "trace_id": sp.trace_id.hex(),
                    "span_id": sp.span_id.hex(),
                    "parent_span_id": sp.parent_span_id.hex(),
                    "name": sp.name,
                    "kind": _KINDS.get(sp.kind, str(sp.kind)),
                    "service": service,
                    "start_ns": int(sp.start_time_unix_nano),
                    "end_ns": int(sp.end_time_unix_nano),
                    "attributes": _attrs(sp.attributes),
                })
    return out


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, rx: "OTLPReceiver"):
        self.rx = rx

    def Export(self, request, context):
        self.rx._add(flatten_request(request))
        return trace_service_pb2.ExportTraceServiceResponse()


class OTLPReceiver:
    """OTLP/gRPC TraceService on host:port (0: any free port); thread-safe span store."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", max_workers: int = 4):
        self.host, self.port = host, port
        self._max_workers = max_workers
        self._spans: list[dict] = []
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None
        self.exports = 0  # Export calls received

    def start(self) -> "OTLPReceiver":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._max_workers),
                             options=[("grpc.max_receive_message_length", 64 << 20)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self), server)
        bound = server.add_insecure_port(f"{self.host}:{self.port}")
        if bound == 0:
            raise OSError(f"cannot listen on {self.host}:{self.port}")
        server.start()
        self.port, self._server = bound, server
        return self

    @property
    def endpoint(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "[::]", "::", "") else self.host
        return f"http://{host}:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def __enter__(self) -> "OTLPReceiver":
        return self if self._server is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _add(self, spans: list[dict]) -> None:
        with self._cond:
            self._spans.extend(spans)
            self.exports += 1
            self._cond.notify_all()

    def spans(self) -> list[dict]:
        """A copy of every span received so far, in arrival order."""
        with self._cond:
            return [dict(s, attributes=dict(s["attributes"])) for s in self._spans]

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()

    def wait_for(self, pred: Callable[[list[dict]], bool], timeout: float = 10.0) -> bool:
        """Block until pred(spans) is true (True) or timeout seconds pass (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if pred(self._spans):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)

    def save_json(self, path: str | Path) -> int:
        spans = self.spans()
        save_spans(spans, path)
        return len(spans)


def save_spans(spans: list[dict], path: str | Path) -> None:
    Path(path).write_text(json.dumps(spans, indent=None, separators=(",", ":")) + "\n")


# --- reading saved spans back ---------------------------------------------------------------

def _otlp_json_value(v: dict) -> Any:
    if not v:
        return None
    (key, val), = v.items()
    if key == "intValue":
        return int(val)
    if key == "doubleValue":
        return float(val)
    if key == "arrayValue":
        return [_otlp_json_value(x) for x in val.get("values", [])]
    if key == "kvlistValue":
        return {kv["key"]: _otlp_json_value(kv.get("value", {})) for kv in val.get("values", [])}
    return val


def _otlp_json_id(s: str) -> str:
    """OTLP/JSON ids are hex; some writers use base64 (protobuf's JSON mapping of bytes)."""
    if not s:
        return ""
    try:
        int(s, 16)
        return s.lower()
    except ValueError:
        import base64
        return base64.b64decode(s).hex()


def _from_otlp_json(doc: dict) -> list[dict]:
    out = []
    for rs in doc.get("resourceSpans", []):
        res = {kv["key"]: _otlp_json_value(kv.get("value", {})) for kv in rs.get("resource", {}).get("attributes", [])}
        service = str(res.get("service.name", ""))
        for ss in rs.get("scopeSpans", rs.get("instrumentationLibrarySpans", [])):
            for sp in ss.get("spans", []):
                kind = sp.get("kind", 0)
                out.append({
                    "trace_id": _otlp_json_id(sp.get("traceId", "")),
                    "span_id": _otlp_json_id(sp.get("spanId", "")),
                    "parent_span_id": _otlp_json_id(sp.get("parentSpanId", "")),
                    "name": sp.get("name", ""),
                    "kind": _KINDS.get(kind, str(kind)) if isinstance(kind, int) else str(kind).replace("SPAN_KIND_", ""),
                    "service": service,
                    "start_ns": int(sp.get("startTimeUnixNano", 0)),
                    "end_ns": int(sp.get("endTimeUnixNano", 0)),
                    "attributes": {kv["key"]: _otlp_json_value(kv.get("value", {})) for kv in sp.get("attributes", [])},
                })
    return out


def _from_jaeger_json(doc: dict) -> list[dict]:
    out = []
    for tr in doc.get("data", []):
        procs = {pid: p.get("serviceName", "") for pid, p in tr.get("processes", {}).items()}
        for sp in tr.get("spans", []):
            parent = next((r.get("spanID", "") for r in sp.get("references", []) if r.get("refType") == "CHILD_OF"), "")
            tags = {t["key"]: t.get("value") for t in sp.get("tags", [])}
            start_us, dur_us = int(sp.get("startTime", 0)), int(sp.get("duration", 0))
            out.append({
                "trace_id": sp.get("traceID", "").rjust(32, "0"),
                "span_id": sp.get("spanID", "").rjust(16, "0"),
                "parent_span_id": parent.rjust(16, "0") if parent else "",
                "name": sp.get("operationName", ""),
                "kind": str(tags.pop("span.kind", "")).upper(),
                "service": procs.get(sp.get("processID", ""), ""),
                "start_ns": start_us * 1000,
                "end_ns": (start_us + dur_us) * 1000,
                "attributes": tags,
            })
    return out


def load_spans(path: str | Path) -> list[dict]:
    """Spans from a file: our JSON list (save_json), OTLP/JSON (one document or one per line)
    or a Jaeger UI trace download."""
    text = Path(path).read_text()
    try:
        docs = [json.loads(text)]
    except json.JSONDecodeError:  # OTLP/JSON lines, one export request per line
        docs = [json.loads(line) for line in text.splitlines() if line.strip()]
    spans: list[dict] = []
    for doc in docs:
        if isinstance(doc, list):
            spans.extend(doc)
        elif "resourceSpans" in doc:
            spans.extend(_from_otlp_json(doc))
        elif "data" in doc:
            spans.extend(_from_jaeger_json(doc))
        else:
            raise ValueError(f"{path}: not a span list, OTLP/JSON or Jaeger JSON document")
    for s in spans:
        s.setdefault("attributes", {})
        s.setdefault("parent_span_id", "")
        s.setdefault("service", "")
    return spans
