"""OpenTelemetry tracing for the ssd services: provider set-up from the standard OTEL_* variables,
W3C trace context in gRPC metadata and HTTP headers, and spans with explicit timestamps.

Lives in services/: the core library (ssd/) never imports OpenTelemetry or grpc.

Set-up (`setup_tracing`) follows the OpenTelemetry environment variables:

* ``OTEL_SERVICE_NAME`` overrides the service name (default ssd-gateway / ssd-target / ssd-draft).
* ``OTEL_TRACES_EXPORTER``: ``otlp`` (gRPC), ``console``, ``none``, or a comma list. When unset,
  OTLP export is on exactly when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set. ``OTEL_SDK_DISABLED=true`` turns tracing off.
  Endpoint, headers, timeout, TLS, compression are read by the OTLP exporter itself
  (``OTEL_EXPORTER_OTLP_*``); batching by the batch processor (``OTEL_BSP_*``).
* ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``: the standard sampler names. When the
  sampler is unset the default is ``parentbased_traceidratio`` with ratio
  ``OTEL_TRACES_SAMPLER_ARG`` or `DEFAULT_SAMPLE_RATIO`: a request sampled at the gateway is
  traced through target and draft, an unsampled one nowhere.

Without any exporter configured `setup_tracing` returns None and `get_tracer` hands out the
API's no-op tracer: spans cost one function call and carry no context, so a local run
without a collector pays close to nothing.

Batched engine steps serve many requests at once, so round spans are not "current" spans:
the target records, per sequence and round, an already-finished span with explicit start and
end times under that request's context (`round_span`, `child_span`), and passes the draft a
traceparent string per sequence (`traceparent_of`, `context_from_traceparent`). Timestamps are
epoch nanoseconds (`now_ns`, i.e. ``time.time_ns()``), not ``perf_counter_ns``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, Union

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (BatchSpanProcessor, ConsoleSpanExporter, SpanExporter,
                                            SimpleSpanProcessor)
from opentelemetry.sdk.trace.sampling import (ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler,
                                              TraceIdRatioBased)
from opentelemetry.trace import INVALID_SPAN_CONTEXT, NonRecordingSpan, Span, SpanContext, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

# --- names ----------------------------------------------------------------------------------

SERVICE_GATEWAY = "ssd-gateway"
SERVICE_TARGET = "ssd-target"
SERVICE_DRAFT = "ssd-draft"
INSTRUMENTATION_NAME = "ssd"

SPAN_REQUEST = "ssd.request"          # gateway root span, one per request
SPAN_VERIFY = "ssd.verify"            # target, one per round and sequence
SPAN_SPECULATE = "ssd.speculate"      # draft, one per round and sequence
SPAN_INDEX_LOOKUP = "ssd.index.lookup"  # child: speculation-cache / index lookup
SPAN_JIT_DRAFT = "ssd.jit_draft"      # child: just-in-time draft after a miss

ATTR_ROUND = "ssd.round"
ATTR_ACCEPTED_TOKENS = "ssd.accepted_tokens"
ATTR_CACHE_RESULT = "ssd.cache_result"  # "hit" | "miss" | "late"
ATTR_BATCH_SIZE = "ssd.batch_size"
ATTR_FAN_OUT = "ssd.fan_out"
ATTR_NUM_SPECULATIVE_TOKENS = "ssd.num_speculative_tokens"
ATTR_VERIFY_MS = "ssd.verify_ms"
ATTR_SPECULATE_MS = "ssd.speculate_ms"
ATTR_SEQ_ID = "ssd.seq_id"
ATTR_REQUEST_ID = "ssd.request_id"

ATTR_STEP = "ssd.step"  # the target's batched-step counter (ssd.round is the sequence's own round)

# OpenTelemetry semantic-convention attributes, set next to ours so generic tools read them
RPC_SYSTEM, RPC_SERVICE, RPC_METHOD = "rpc.system", "rpc.service", "rpc.method"
RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"
SERVER_ADDRESS, SERVER_PORT = "server.address", "server.port"
GEN_AI_SYSTEM, GEN_AI_PROVIDER = "gen_ai.system", "gen_ai.provider.name"
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_MAX_TOKENS, GEN_AI_TEMPERATURE, GEN_AI_TOP_P = (
    "gen_ai.request.max_tokens", "gen_ai.request.temperature", "gen_ai.request.top_p")
GEN_AI_INPUT_TOKENS, GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"
GEN_AI_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_SYSTEM_NAME = "ssd"  # no registered provider name fits a self-hosted server: our own

CACHE_HIT, CACHE_MISS, CACHE_LATE = "hit", "miss", "late"
CACHE_RESULTS = (CACHE_HIT, CACHE_MISS, CACHE_LATE)

# Ratio of the default sampler (parentbased_traceidratio) when OTEL_TRACES_SAMPLER is unset and
# OTEL_TRACES_SAMPLER_ARG gives none. A sampled request costs a few spans per round (measured on
# the 2-core dev machine: ~45 us to record one, ~90 us more to encode and export it in the
# background), so tracing every request of a large batch would cost more than the 3 % budget;
# one request in ten keeps it well inside. OTEL_TRACES_SAMPLER_ARG=1 traces every request.
DEFAULT_SAMPLE_RATIO = 0.1

_PROPAGATOR = TraceContextTextMapPropagator()
_NOOP_TRACER = trace.NoOpTracer()

now_ns = time.time_ns  # epoch nanoseconds: the clock spans use

ParentLike = Union[Context, Span, SpanContext, str, None]


# --- provider set-up ------------------------------------------------------------------------

def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def _ratio(arg: str, default: float) -> float:
    if not arg:
        return default
    try:
        r = float(arg)
    except ValueError:
        log.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a number; using %s", arg, default)
        return default
    return min(1.0, max(0.0, r))


def sampler_from_env() -> Sampler:
    """The sampler named by OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG; unset: parent-based
    trace-id ratio with DEFAULT_SAMPLE_RATIO (or the ARG when only that is given)."""
    name = _env("OTEL_TRACES_SAMPLER").lower()
    arg = _env("OTEL_TRACES_SAMPLER_ARG")
    if name in ("", "parentbased_traceidratio"):
        return ParentBased(TraceIdRatioBased(_ratio(arg, DEFAULT_SAMPLE_RATIO)))
    if name == "traceidratio":
        return TraceIdRatioBased(_ratio(arg, 1.0))
    if name == "always_on":
        return ALWAYS_ON
    if name == "always_off":
        return ALWAYS_OFF
    if name == "parentbased_always_on":
        return ParentBased(ALWAYS_ON)
    if name == "parentbased_always_off":
        return ParentBased(ALWAYS_OFF)
    log.warning("unknown OTEL_TRACES_SAMPLER=%r; using parentbased_traceidratio", name)
    return ParentBased(TraceIdRatioBased(_ratio(arg, DEFAULT_SAMPLE_RATIO)))


def exporters_from_env() -> list[SpanExporter]:
    """Span exporters named by OTEL_TRACES_EXPORTER (otlp | console | none, comma separated);
    unset: OTLP gRPC when an OTLP endpoint variable is set, else none."""
    if _env("OTEL_SDK_DISABLED").lower() == "true":
        return []
    raw = _env("OTEL_TRACES_EXPORTER").lower()
    if raw:
        names = [n.strip() for n in raw.split(",") if n.strip()]
    elif _env("OTEL_EXPORTER_OTLP_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        names = ["otlp"]
    else:
        names = []
    if "none" in names:
        return []
    out: list[SpanExporter] = []
    for n in dict.fromkeys(names):
        if n == "otlp":
            proto = (_env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").lower()
            if proto != "grpc":
                log.warning("OTLP protocol %r is not supported here; exporting OTLP over gRPC", proto)
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            out.append(OTLPSpanExporter())
        elif n == "console":
            out.append(ConsoleSpanExporter())
        else:
            log.warning("unknown OTEL_TRACES_EXPORTER entry %r ignored", n)
    return out


def make_tracer_provider(service_name: str, exporters: list[SpanExporter] | SpanExporter | None = None,
                         sampler: Sampler | None = None, batch: bool = True) -> TracerProvider:
    """A TracerProvider (not installed globally) for `service_name` with the given exporters
    (batch processor, or a synchronous one with batch=False) and sampler (default:
    `sampler_from_env()`). Several may coexist in one process, e.g. three in-process services."""
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}),
                              sampler=sampler if sampler is not None else sampler_from_env())
    if isinstance(exporters, SpanExporter):
        exporters = [exporters]
    for exp in exporters or []:
        provider.add_span_processor(BatchSpanProcessor(exp) if batch else SimpleSpanProcessor(exp))
    return provider


def build_tracer_provider_from_env(service_name: str) -> TracerProvider | None:
    """What `setup_tracing` installs, without caching or global state: a provider for
    OTEL_SERVICE_NAME (else `service_name`), or None when no exporter is configured."""
    exporters = exporters_from_env()
    if not exporters:
        return None
    return make_tracer_provider(_env("OTEL_SERVICE_NAME") or service_name, exporters)


_lock = threading.Lock()
_providers: dict[str, TracerProvider | None] = {}
_global_set = False


def setup_tracing(service_name: str, set_global: bool = True) -> TracerProvider | None:
    """Configure tracing for this service from the environment (module docstring). Idempotent:
    a second call with the same name returns the same provider. The first provider becomes the
    global one (unless set_global=False); in-process stacks with several services should take
    their tracer from `get_tracer(service_name)` rather than the global API."""
    global _global_set
    with _lock:
        if service_name in _providers:
            return _providers[service_name]
        provider = build_tracer_provider_from_env(service_name)
        _providers[service_name] = provider
        if provider is not None:
            log.info("tracing on for %s: sampler %s", service_name, provider.sampler.get_description())
            if set_global and not _global_set:
                trace.set_tracer_provider(provider)
                _global_set = True
        return provider


def get_tracer(service: str | TracerProvider | None = None) -> trace.Tracer:
    """The ssd tracer of a provider, of the provider `setup_tracing(service)` made, or (no
    argument) of the global SDK provider; the no-op tracer when tracing is off, setup_tracing
    was not called for that name, or no SDK provider is installed globally."""
    if isinstance(service, TracerProvider):
        provider = service
    elif service:
        provider = _providers.get(service)
    else:
        gp = trace.get_tracer_provider()
        provider = gp if isinstance(gp, TracerProvider) else None
    if provider is None:
        return _NOOP_TRACER
    return provider.get_tracer(INSTRUMENTATION_NAME)


def tracing_enabled(tracer: trace.Tracer) -> bool:
    return not isinstance(tracer, trace.NoOpTracer)


def shutdown(timeout_ms: int = 5000) -> None:
    """Flush and shut down every provider `setup_tracing` made (call on drain/exit)."""
    with _lock:
        providers = [p for p in _providers.values() if p is not None]
        _providers.clear()
    for p in providers:
        try:
            p.force_flush(timeout_ms)
        finally:
            p.shutdown()


def force_flush(timeout_ms: int = 5000) -> bool:
    with _lock:
        providers = [p for p in _providers.values() if p is not None]
    return all(p.force_flush(timeout_ms) for p in providers)


# --- W3C trace context ----------------------------------------------------------------------

def _span_context_of(x: ParentLike) -> SpanContext:
    if isinstance(x, str):  # most frequent in batched steps: a sequence's traceparent
        return span_context_from_traceparent(x)
    if x is None:
        return trace.get_current_span().get_span_context()
    if isinstance(x, SpanContext):
        return x
    if isinstance(x, Span):
        return x.get_span_context()
    return trace.get_current_span(x).get_span_context()


def _as_context(x: ParentLike) -> Context | None:
    """A Context whose current span is x (None: the ambient context)."""
    if x is None or isinstance(x, Context):
        return x
    if isinstance(x, str):
        return context_from_traceparent(x)
    if isinstance(x, SpanContext):
        return trace.set_span_in_context(NonRecordingSpan(x), Context())
    return trace.set_span_in_context(x, Context())


def inject_metadata(ctx: ParentLike = None) -> list[tuple[str, str]]:
    """gRPC client metadata (traceparent, tracestate) for ctx (Context, Span, SpanContext or
    traceparent string; None: the current context). Empty when there is no valid span."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=_as_context(ctx))
    return list(carrier.items())


def inject_headers(headers: dict | None = None, ctx: ParentLike = None) -> dict:
    """Add traceparent/tracestate HTTP headers for ctx to `headers` (a new dict by default)."""
    headers = {} if headers is None else headers
    _PROPAGATOR.inject(headers, context=_as_context(ctx))
    return headers


def extract_headers(headers: Mapping[str, str] | None) -> Context:
    """The remote parent context carried by HTTP headers (any case) or a metadata mapping."""
    if not headers:
        return Context()
    carrier = {str(k).lower(): v for k, v in headers.items()}
    return _PROPAGATOR.extract(carrier, context=Context())


def extract_grpc(servicer_context: Any) -> Context:
    """The remote parent context a gRPC call carries in its metadata (servicer side)."""
    md = servicer_context.invocation_metadata() if servicer_context is not None else None
    if not md:
        return Context()
    carrier = {}
    for item in md:
        k, v = (item.key, item.value) if hasattr(item, "key") else item
        if isinstance(v, str):
            carrier[k.lower()] = v
    return _PROPAGATOR.extract(carrier, context=Context())


def traceparent_of(span_or_ctx: ParentLike = None) -> str:
    """The W3C traceparent of a Span, SpanContext or Context ("" when it holds no valid span)."""
    sc = _span_context_of(span_or_ctx)
    if not sc.is_valid:
        return ""
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def context_from_traceparent(s: str | None, tracestate: str | None = None) -> Context:
    """A Context whose (remote) parent is the traceparent string; empty Context for ""/invalid."""
    if not s:
        return Context()
    carrier = {"traceparent": s}
    if tracestate:
        carrier["tracestate"] = tracestate
    return _PROPAGATOR.extract(carrier, context=Context())


@functools.lru_cache(maxsize=8192)
def _parse_traceparent(s: str) -> SpanContext:
    return trace.get_current_span(context_from_traceparent(s)).get_span_context()


def span_context_from_traceparent(s: str | None) -> SpanContext:
    """The (remote) SpanContext of a traceparent string, INVALID_SPAN_CONTEXT for ""/invalid.
    Cached: a sequence's traceparent is looked at every round."""
    return _parse_traceparent(s) if s else INVALID_SPAN_CONTEXT


# --- spans ----------------------------------------------------------------------------------

def _clean(attributes: Mapping[str, Any] | None) -> dict | None:
    if not attributes:
        return None
    return {k: v for k, v in attributes.items() if v is not None}


def sampled(x: ParentLike) -> bool:
    """Whether x (Context, Span, SpanContext, traceparent) is a valid, sampled span: the cheap
    test a batched step can make per sequence before preparing span attributes."""
    sc = _span_context_of(x)
    return sc.is_valid and sc.trace_flags.sampled


def _drops_unsampled_children(tracer: trace.Tracer) -> bool:
    s = getattr(tracer, "sampler", None)
    if not isinstance(s, ParentBased):
        return False
    off = ALWAYS_OFF.get_description()
    return all(getattr(s, a, None) is not None and getattr(s, a).get_description() == off
               for a in ("_remote_parent_not_sampled", "_local_parent_not_sampled"))


def round_span(tracer: trace.Tracer, name: str, parent_ctx: ParentLike, start_ns: int, end_ns: int,
               attributes: Mapping[str, Any] | None = None, kind: SpanKind = SpanKind.INTERNAL) -> SpanContext:
    """Record an already-finished span `name` from start_ns to end_ns (epoch ns) under
    parent_ctx (Context, Span, SpanContext or traceparent string; None: the current span) and
    return its SpanContext, for children and for traceparent_of. Attributes with value None are
    dropped. Nothing is recorded, and the invalid context returned, with the no-op tracer or
    without a valid parent: a round of an untraced request never starts a trace of its own.
    Whether a recorded span is exported is the sampler's call (parent-based by default)."""
    if isinstance(tracer, trace.NoOpTracer):
        return INVALID_SPAN_CONTEXT
    parent = _span_context_of(parent_ctx)
    if not parent.is_valid:
        return INVALID_SPAN_CONTEXT
    if not parent.trace_flags.sampled and _drops_unsampled_children(tracer):
        return parent  # what the SDK would decide, without making a span (hot path of batched steps)
    ctx = trace.set_span_in_context(NonRecordingSpan(parent), Context())
    span = tracer.start_span(name, context=ctx, kind=kind, attributes=_clean(attributes), start_time=int(start_ns))
    span.end(end_time=int(max(end_ns, start_ns)))
    return span.get_span_context()


def child_span(tracer: trace.Tracer, name: str, parent: ParentLike, start_ns: int, end_ns: int,
               attributes: Mapping[str, Any] | None = None) -> SpanContext:
    """An already-finished child of `parent` (typically the SpanContext a round_span returned),
    e.g. `ssd.index.lookup` or `ssd.jit_draft` (nothing when parent is not a valid span)."""
    if parent is None:
        return INVALID_SPAN_CONTEXT
    return round_span(tracer, name, parent, start_ns, end_ns, attributes)


@contextlib.contextmanager
def server_span(tracer: trace.Tracer, name: str, servicer_context: Any = None,
                attributes: Mapping[str, Any] | None = None, parent: ParentLike = None) -> Iterator[Span]:
    """A live SERVER span for a gRPC handler, child of the caller's trace context (from the
    call's metadata, or `parent`), made current for the block."""
    ctx = _as_context(parent) if parent is not None else extract_grpc(servicer_context)
    with tracer.start_as_current_span(name, context=ctx, kind=SpanKind.SERVER,
                                      attributes=_clean(attributes)) as span:
        yield span


def attach(ctx: Context):
    """Make ctx current (returns a token for `detach`), e.g. around a client call."""
    return otel_context.attach(ctx)


def detach(token) -> None:
    otel_context.detach(token)


# --- rpc spans ------------------------------------------------------------------------------

HTTP_METHOD = "http.request.method"  # the HTTP conventions, on requests served over HTTP
HTTP_ROUTE = "http.route"


def rpc_attributes(full_method: str, address: str | None = None) -> dict:
    """The conventions' rpc.* attributes of a gRPC method "/pkg.Service/Method", with
    server.address / server.port of the peer (client side) when address ("host:port") is given."""
    service, _, method = full_method.strip("/").partition("/")
    attrs: dict[str, Any] = {RPC_SYSTEM: "grpc", RPC_SERVICE: service, RPC_METHOD: method}
    if address:
        host, _, port = address.rpartition(":")
        attrs[SERVER_ADDRESS] = host.strip("[]") or address
        if port.isdigit():
            attrs[SERVER_PORT] = int(port)
    return attrs


def start_client_span(tracer: trace.Tracer, full_method: str, parent: ParentLike, address: str | None = None) -> Span:
    """A live CLIENT span for an outgoing gRPC call, named "pkg.Service/Method" as the
    conventions name rpc spans, under parent; `inject_metadata(span)` carries it to the server,
    whose SERVER span becomes its child. End it with `end_rpc_span`."""
    return tracer.start_span(full_method.strip("/"), context=_as_context(parent), kind=SpanKind.CLIENT,
                             attributes=rpc_attributes(full_method, address))


def end_rpc_span(span: Span, status_code: int, message: str = "") -> None:
    """Record the call's gRPC status (rpc.grpc.status_code; ERROR for a client span unless OK) and end it."""
    span.set_attribute(RPC_GRPC_STATUS_CODE, int(status_code))
    if status_code != 0:
        span.set_status(trace.Status(trace.StatusCode.ERROR, message or None))
    span.end()
