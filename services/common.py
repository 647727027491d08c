"""What every ssd service shares: server options, health, reflection, graceful drain."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .protos import pb

# One message limit for every server and channel of the project. A sampled speculation cache
# carries compact q rows (only the draft head's support: `put_q_rows` in services/convert.py), about
# 1.6 MB per sequence for the default draft, so max batch fits with room; a larger request gets
# RESOURCE_EXHAUSTED, and a draft reply that would not fit is refused by the draft (logged) and
# the target falls back instead of losing the stream.
MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
# long-lived streams between services ping every SSD_GRPC_KEEPALIVE_MS (10 s), so a peer that
# vanished without closing its connection (node loss, partition) is noticed in seconds rather
# than at TCP's timeout. Servers must accept pings that often (else: GOAWAY "too_many_pings").
def keepalive_ms() -> int:
    return int(os.environ.get("SSD_GRPC_KEEPALIVE_MS", "10000"))


def keepalive_client_options() -> list[tuple]:
    return [("grpc.keepalive_time_ms", keepalive_ms()), ("grpc.keepalive_timeout_ms", max(1000, keepalive_ms() // 2)),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]


def keepalive_server_options() -> list[tuple]:
    return [("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", max(100, keepalive_ms() // 2))]


def client_options(*extra: tuple) -> list[tuple]:
    """Options of every channel a service opens to another service."""
    return [*CHANNEL_OPTIONS, *keepalive_client_options(), *extra]


def make_server(max_workers: int = 32, interceptors=()) -> grpc.Server:
    """A server of the project's options whose rpcs refuse undecodable requests with
    INVALID_ARGUMENT (DecodeGuard, outermost) before any other interceptor sees them."""
    return grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=CHANNEL_OPTIONS + keepalive_server_options(),
                       interceptors=[DecodeGuard(), *interceptors])


# ---- requests that do not decode ------------------------------------------------------------------
class _Undecodable:
    """Stands in for a request message whose bytes did not parse; the rpc is refused with `why`."""

    __slots__ = ("why",)

    def __init__(self, why: str):
        self.why = why


def _lenient(deserialize):
    """deserialize(bytes), returning an _Undecodable instead of raising (gRPC would answer a
    raising deserializer with INTERNAL and log a traceback: a server fault for a client's bytes)."""
    owner = getattr(deserialize, "__self__", None)
    name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request message")

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 - DecodeError, invalid UTF-8, truncated varints, ...
            return _Undecodable(f"the request is not a valid {name}: {e or type(e).__name__}")

    return parse


class DecodeGuard(grpc.ServerInterceptor):
    """Every rpc's request bytes that do not decode (garbage, invalid UTF-8 in a string field, an
    over-long varint) get INVALID_ARGUMENT naming the message type, and nothing is logged."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        kind = ("stream" if handler.request_streaming else "unary") + "_" + ("stream" if handler.response_streaming else "unary")
        behavior = getattr(handler, kind)
        if handler.request_streaming:  # the requests may be read on another thread: end them there, refuse here
            def guarded(requests, context):
                bad: list[str] = []
                result = behavior(_until_undecodable(requests, bad), context)
                if handler.response_streaming:
                    return _refused_after(result, bad, context)
                if bad:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad[0])
                return result
        else:
            def guarded(request, context):
                if isinstance(request, _Undecodable):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.why)
                return behavior(request, context)
        return handler._replace(request_deserializer=_lenient(handler.request_deserializer), **{kind: guarded})


def _until_undecodable(requests, bad: list):
    """The request stream, ended at the first message that did not decode (its reason into bad),
    as if the client had closed its side there."""
    for r in requests:
        if isinstance(r, _Undecodable):
            bad.append(r.why)
            return
        yield r


def _refused_after(responses, bad: list, context):
    """The handler's responses until the request stream turned out undecodable; then the rpc
    ends with INVALID_ARGUMENT (raised on the thread that serves the rpc, where abort works)."""
    for r in responses:
        if bad:
            break
        yield r
    if bad:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad[0])


# ---- who may call ---------------------------------------------------------------------------------
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes and discovery need no key


def load_api_keys(keys: str = "", key_file: str = "", env: str = "SSD_API_KEYS") -> frozenset[str]:
    """API keys from a comma-separated list, a file (one per line, # comments) and the
    environment variable `env` (comma-separated), all together. Empty: no key is required."""
    found = [k for k in keys.split(",")]
    if key_file:
        found += [line.split("#", 1)[0] for line in open(key_file, encoding="utf-8").read().splitlines()]
    found += os.environ.get(env, "").split(",")
    return frozenset(k.strip() for k in found if k.strip())


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Refuses calls without "authorization: Bearer <key>" metadata (UNAUTHENTICATED), except
    the health and reflection services."""

    def __init__(self, keys: frozenset[str]):
        self.keys = frozenset(keys)

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key (metadata authorization: Bearer <key>)")

        self._deny = {
            (False, False): grpc.unary_unary_rpc_method_handler(deny),
            (False, True): grpc.unary_stream_rpc_method_handler(deny),
            (True, False): grpc.stream_unary_rpc_method_handler(deny),
            (True, True): grpc.stream_stream_rpc_method_handler(deny),
        }

    def intercept_service(self, continuation, details):
        if not self.keys or details.method.startswith(OPEN_METHODS):
            return continuation(details)
        auth = dict(details.invocation_metadata or ()).get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip() in self.keys:
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        return self._deny[(handler.request_streaming, handler.response_streaming)]


def add_port(server: grpc.Server, address: str, tls_cert: str = "", tls_key: str = "") -> int:
    """Bind address, with TLS when a certificate and key (PEM files) are given."""
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    if not tls_cert:
        return server.add_insecure_port(address)
    with open(tls_key, "rb") as k, open(tls_cert, "rb") as c:
        creds = grpc.ssl_server_credentials([(k.read(), c.read())])
    return server.add_secure_port(address, creds)


class DrainingHealth(health.HealthServicer):
    """The standard health service, except that a drain ends every open Watch stream (after
    its NOT_SERVING) instead of leaving it open: a watch never ends on its own, so an open one
    would hold the server's graceful stop for the whole grace period. A Watch that arrives
    while draining gets NOT_SERVING and is closed at once."""

    def enter_graceful_shutdown(self):
        super().enter_graceful_shutdown()
        self._close_watches()

    def Watch(self, request, context, send_response_callback=None):
        if send_response_callback is not None:
            send_response_callback = _closes_once(send_response_callback)
        watcher = super().Watch(request, context, send_response_callback)
        if self._gracefully_shutting_down:
            self._close_watches()
        return watcher

    def _close_watches(self) -> None:
        with self._lock:
            callbacks = [cb for cbs in self._send_response_callbacks.values() for cb in cbs]
        for send in callbacks:
            send(None)  # None ends the stream (status OK); the rpc's close callback forgets it


def _closes_once(send):
    """A Watch response callback that ignores everything after the None that ended its stream
    (the health servicer sends None again when the rpc's close callback runs)."""
    closed, lock = [], threading.Lock()

    def guarded(response):
        with lock:
            if closed:
                return
            if response is None:
                closed.append(True)
            send(response)

    return guarded


def add_health_and_reflection(server: grpc.Server, service_names: list[str]) -> health.HealthServicer:
    hs = DrainingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    names = [pb.DESCRIPTOR.services_by_name[n].full_name for n in service_names]
    for n in names + [""]:
        hs.set(n, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(names + [REFLECTION_V1, reflection.SERVICE_NAME, health.SERVICE_NAME], server)
    _add_reflection_v1(server, names + [REFLECTION_V1, reflection.SERVICE_NAME, health.SERVICE_NAME])
    return hs


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _add_reflection_v1(server: grpc.Server, names: list[str]) -> None:
    """Reflection under its v1 name as well (newer grpcurl and Postman ask for v1 first). The v1
    and v1alpha messages are the same on the wire, so the v1alpha servicer answers both."""
    from grpc_reflection.v1alpha import reflection_pb2

    _register_reflection_v1_descriptor()
    servicer = reflection.ReflectionServicer(names)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString),
    }),))


REFLECTION_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _register_reflection_v1_descriptor() -> None:
    """Put the v1 reflection service's file into the default descriptor pool, so reflection can
    describe grpc.reflection.v1.ServerReflection like every other service it lists (a client that
    describes each listed service, as `grpcurl describe` does, would fail on it otherwise).
    grpcio-reflection ships only the v1alpha file; v1 has the same messages and method under
    another package, so the file is the v1alpha one with its package renamed."""
    from google.protobuf import descriptor_pb2, descriptor_pool
    from grpc_reflection.v1alpha import reflection_pb2

    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(REFLECTION_V1_FILE)
        return
    except KeyError:
        pass
    old, new = reflection_pb2.DESCRIPTOR.package, "grpc.reflection.v1"
    f = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(f)
    f.name, f.package = REFLECTION_V1_FILE, new
    f.ClearField("options")  # language packages of the v1alpha file
    rename = lambda t: t.replace(f".{old}.", f".{new}.", 1)  # noqa: E731
    messages = list(f.message_type)
    while messages:
        message = messages.pop()
        messages += message.nested_type
        for field in message.field:
            if field.type_name:
                field.type_name = rename(field.type_name)
    for service in f.service:
        for method in service.method:
            method.input_type, method.output_type = rename(method.input_type), rename(method.output_type)
    pool.AddSerializedFile(f.SerializeToString())


def drain(server: grpc.Server, hs: health.HealthServicer, grace_s: float, on_drain=None, on_stop=None,
          unready_s: float = 2.0) -> None:
    """Stop serving gracefully within grace_s: health NOT_SERVING and every health Watch stream
    closed at once; on_drain(deadline) (a time.monotonic() instant) refuses the service's new
    requests and may wait for its in-flight ones up to that deadline; probes are still answered
    (NOT_SERVING) for at least unready_s, so load balancers and kubelets see it; then the gRPC
    server refuses new rpcs and lets the in-flight ones finish within what is left of grace_s;
    then on_stop()."""
    started = time.monotonic()
    deadline = started + grace_s
    logging.getLogger("ssd").info("draining (grace %.0f s)", grace_s)
    hs.enter_graceful_shutdown()
    if on_drain is not None:
        on_drain(deadline)
    time.sleep(max(0.0, started + min(unready_s, grace_s / 2) - time.monotonic()))
    server.stop(max(0.0, deadline - time.monotonic())).wait()
    if on_stop is not None:
        on_stop()


def drain_on_sigterm(server: grpc.Server, hs: health.HealthServicer, grace_s: float, on_stop=None,
                     unready_s: float = 2.0, on_drain=None) -> threading.Event:
    """SIGTERM or SIGINT (any number of them): `drain` once, in a thread; the returned Event is
    set when it is done."""
    done = threading.Event()

    def run():
        drain(server, hs, grace_s, on_drain, on_stop, unready_s)
        done.set()

    def stop(*_):
        if not getattr(stop, "started", False):
            stop.started = True
            threading.Thread(target=run, daemon=True, name="drain").start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return done


def stats_to_pb(s) -> "pb.SpecDecodeStats":
    return pb.SpecDecodeStats(
        num_rounds=s.num_rounds, num_drafts=s.num_drafts, num_draft_tokens=s.num_draft_tokens,
        num_accepted_tokens=s.num_accepted_tokens, num_accepted_tokens_per_pos=s.num_accepted_tokens_per_pos,
        cache_hit=s.cache_hit, cache_late=s.cache_late, cache_miss=s.cache_miss)
