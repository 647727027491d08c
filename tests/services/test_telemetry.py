"""Tracing building blocks against a real OTLP/gRPC receiver: the SDK's OTLP exporter over a
socket, W3C context across a real gRPC call between two "services", explicit-timestamp round
spans, sampling, and exporter selection from the OTEL_* environment."""
from concurrent import futures

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc")

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # noqa: E402
from opentelemetry.sdk.trace.export import ConsoleSpanExporter  # noqa: E402
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased  # noqa: E402

from ssd.services import telemetry as tm  # noqa: E402
from ssd.services.otlp_receiver import OTLPReceiver, load_spans  # noqa: E402

OTEL_VARS = ("OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
             "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG")


@pytest.fixture
def clean_env(monkeypatch):
    for v in OTEL_VARS:
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def rx():
    r = OTLPReceiver(port=0).start()
    yield r
    r.stop()


def _provider(rx, service, sampler=ParentBased(ALWAYS_ON)):
    return tm.make_tracer_provider(service, OTLPSpanExporter(endpoint=rx.endpoint, insecure=True), sampler=sampler)


def _flush(*providers):
    for p in providers:
        assert p.force_flush(5000)


def test_context_across_grpc_and_round_spans(rx):
    rx.clear()
    gw_p, tg_p = _provider(rx, tm.SERVICE_GATEWAY), _provider(rx, tm.SERVICE_TARGET)
    gw, tg = tm.get_tracer(gw_p), tm.get_tracer(tg_p)
    seen = {}

    def handle(request: bytes, context) -> bytes:
        with tm.server_span(tg, "ssd.target.generate", context, {tm.ATTR_REQUEST_ID: "r1"}) as sp:
            seen["traceparent_in"] = dict(context.invocation_metadata()).get("traceparent")
            t = tm.now_ns()
            for r in range(3):  # a batched step records each sequence's round after the fact
                v = tm.round_span(tg, tm.SPAN_VERIFY, sp, t + r * 10_000_000, t + r * 10_000_000 + 8_000_000,
                                  {tm.ATTR_ROUND: r, tm.ATTR_ACCEPTED_TOKENS: r + 1, tm.ATTR_CACHE_RESULT: "hit",
                                   tm.ATTR_BATCH_SIZE: 4, tm.ATTR_SEQ_ID: 7, tm.ATTR_VERIFY_MS: 8.0,
                                   tm.ATTR_CACHE_RESULT + ".unused": None})
                tm.child_span(tg, tm.SPAN_INDEX_LOOKUP, v, t + r * 10_000_000, t + r * 10_000_000 + 1_000_000)
                # the draft gets a traceparent string per sequence inside its round protocol
                seen.setdefault("draft_parents", []).append(tm.traceparent_of(v))
        return b"ok:" + request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Svc", {"Call": grpc.unary_unary_rpc_method_handler(handle)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary("/test.Svc/Call")
            with gw.start_as_current_span(tm.SPAN_REQUEST) as root:
                assert call(b"x", metadata=tm.inject_metadata(), timeout=10) == b"ok:x"
                root_tp = tm.traceparent_of(root)
    finally:
        server.stop(0)

    # the "draft" service: spans under the traceparent strings it received
    dr_p = _provider(rx, tm.SERVICE_DRAFT)
    dr = tm.get_tracer(dr_p)
    for r, tp in enumerate(seen["draft_parents"]):
        t = tm.now_ns()
        s = tm.round_span(dr, tm.SPAN_SPECULATE, tp, t, t + 5_000_000, {tm.ATTR_ROUND: r, tm.ATTR_FAN_OUT: 3})
        tm.child_span(dr, tm.SPAN_JIT_DRAFT, s, t, t + 1_000_000)
    _flush(gw_p, tg_p, dr_p)
    assert rx.wait_for(lambda s: len(s) >= 1 + 1 + 6 + 6, timeout=10)
    spans = rx.spans()
    for p in (gw_p, tg_p, dr_p):
        p.shutdown()

    assert seen["traceparent_in"] == root_tp
    assert len({s["trace_id"] for s in spans}) == 1
    by_id = {s["span_id"]: s for s in spans}
    (root_s,) = [s for s in spans if s["name"] == tm.SPAN_REQUEST]
    (srv,) = [s for s in spans if s["name"] == "ssd.target.generate"]
    assert root_s["service"] == "ssd-gateway" and root_s["parent_span_id"] == ""
    assert srv["service"] == "ssd-target" and srv["parent_span_id"] == root_s["span_id"] and srv["kind"] == "SERVER"
    verify = sorted((s for s in spans if s["name"] == tm.SPAN_VERIFY), key=lambda s: s["attributes"][tm.ATTR_ROUND])
    assert [v["attributes"][tm.ATTR_ROUND] for v in verify] == [0, 1, 2]
    for r, v in enumerate(verify):
        assert v["parent_span_id"] == srv["span_id"]
        assert v["end_ns"] - v["start_ns"] == 8_000_000
        assert v["attributes"] == {tm.ATTR_ROUND: r, tm.ATTR_ACCEPTED_TOKENS: r + 1, tm.ATTR_CACHE_RESULT: "hit",
                                   tm.ATTR_BATCH_SIZE: 4, tm.ATTR_SEQ_ID: 7, tm.ATTR_VERIFY_MS: 8.0}
    lookups = [s for s in spans if s["name"] == tm.SPAN_INDEX_LOOKUP]
    assert sorted(by_id[s["parent_span_id"]]["attributes"][tm.ATTR_ROUND] for s in lookups) == [0, 1, 2]
    specs = [s for s in spans if s["name"] == tm.SPAN_SPECULATE]
    assert len(specs) == 3
    for s in specs:
        parent = by_id[s["parent_span_id"]]
        assert s["service"] == "ssd-draft" and parent["name"] == tm.SPAN_VERIFY
        assert parent["attributes"][tm.ATTR_ROUND] == s["attributes"][tm.ATTR_ROUND]
    jits = [s for s in spans if s["name"] == tm.SPAN_JIT_DRAFT]
    assert {by_id[j["parent_span_id"]]["name"] for j in jits} == {tm.SPAN_SPECULATE}


def test_save_and_load(rx, tmp_path):
    rx.clear()
    p = _provider(rx, tm.SERVICE_TARGET)
    with tm.get_tracer(p).start_as_current_span("a", attributes={"k": [1, 2], "b": True}):
        pass
    _flush(p)
    assert rx.wait_for(lambda s: len(s) == 1, timeout=10)
    p.shutdown()
    assert rx.save_json(tmp_path / "s.json") == 1
    assert load_spans(tmp_path / "s.json") == rx.spans()
    assert rx.spans()[0]["attributes"] == {"k": [1, 2], "b": True}


def test_sampling_ratio_zero_and_parent_based(rx):
    rx.clear()
    p = _provider(rx, tm.SERVICE_TARGET, sampler=ParentBased(TraceIdRatioBased(0.0)))
    t = tm.get_tracer(p)
    with t.start_as_current_span("root-unsampled") as sp:
        assert not sp.get_span_context().trace_flags.sampled
        unsampled_tp = tm.traceparent_of(sp)
        assert int(unsampled_tp[-2:], 16) & 1 == 0  # sampled bit off (the random bit may be set)
    # a round under an unsampled request is not exported either (and yields an unsampled context)
    sc = tm.round_span(t, tm.SPAN_VERIFY, unsampled_tp, 1, 2, {tm.ATTR_ROUND: 0})
    assert not sc.trace_flags.sampled and tm.traceparent_of(sc) == unsampled_tp  # no span made at all
    assert not tm.sampled(unsampled_tp) and tm.sampled("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    # a sampler that samples children of unsampled parents still gets its say
    always = tm.get_tracer(tm.make_tracer_provider("y", sampler=ParentBased(TraceIdRatioBased(0.0), local_parent_not_sampled=ALWAYS_ON,
                                                                               remote_parent_not_sampled=ALWAYS_ON)))
    assert tm.round_span(always, tm.SPAN_VERIFY, unsampled_tp, 1, 2).trace_flags.sampled
    sampled_parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    tm.round_span(t, tm.SPAN_VERIFY, sampled_parent, 10, 20, {tm.ATTR_ROUND: 1})
    with t.start_as_current_span("child-of-sampled", context=tm.context_from_traceparent(sampled_parent)):
        pass
    _flush(p)
    assert rx.wait_for(lambda s: len(s) >= 2, timeout=10)
    p.shutdown()
    spans = rx.spans()
    assert sorted(s["name"] for s in spans) == ["child-of-sampled", tm.SPAN_VERIFY]
    assert all(s["trace_id"] == "0af7651916cd43dd8448eb211c80319c" and s["parent_span_id"] == "b7ad6b7169203331"
               for s in spans)


def test_round_span_needs_a_parent_and_noop_is_free():
    noop = tm.get_tracer("ssd-never-set-up")
    assert not tm.tracing_enabled(noop)
    assert not tm.round_span(noop, tm.SPAN_VERIFY, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", 1, 2).is_valid
    p = tm.make_tracer_provider("x", sampler=ALWAYS_ON)
    t = tm.get_tracer(p)
    assert tm.tracing_enabled(t)
    assert not tm.round_span(t, tm.SPAN_VERIFY, "", 1, 2).is_valid      # no request trace: no orphan trace
    assert not tm.round_span(t, tm.SPAN_VERIFY, None, 1, 2).is_valid    # no current span either
    assert not tm.child_span(t, tm.SPAN_JIT_DRAFT, None, 1, 2).is_valid


def test_trace_context_helpers():
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    ctx = tm.context_from_traceparent(tp)
    assert tm.traceparent_of(ctx) == tp
    assert dict(tm.inject_metadata(ctx))["traceparent"] == tp
    assert dict(tm.inject_metadata(tp))["traceparent"] == tp
    assert tm.traceparent_of(tm.extract_headers({"TraceParent": tp, "Content-Type": "x"})) == tp
    assert tm.inject_headers(ctx=tp) == {"traceparent": tp}
    assert tm.traceparent_of(tm.context_from_traceparent("garbage")) == ""
    assert tm.traceparent_of(tm.extract_headers({})) == ""
    assert tm.inject_metadata(tm.context_from_traceparent("")) == []

    class Ctx:
        def invocation_metadata(self):
            return (("traceparent", tp), ("bin-bin", b"\x00"))
    assert tm.traceparent_of(tm.extract_grpc(Ctx())) == tp


def test_exporters_and_sampler_from_env(clean_env):
    assert tm.exporters_from_env() == []
    assert tm.build_tracer_provider_from_env("ssd-target") is None      # local run: no exporter, no provider

    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    (exp,) = tm.exporters_from_env()
    assert isinstance(exp, OTLPSpanExporter)
    exp.shutdown()
    p = tm.build_tracer_provider_from_env("ssd-target")
    assert p.resource.attributes["service.name"] == "ssd-target"
    clean_env.setenv("OTEL_SERVICE_NAME", "renamed")
    p2 = tm.build_tracer_provider_from_env("ssd-target")
    assert p2.resource.attributes["service.name"] == "renamed"
    for q in (p, p2):
        q.shutdown()

    clean_env.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tm.exporters_from_env() == []
    clean_env.setenv("OTEL_TRACES_EXPORTER", "console")
    assert [type(e) for e in tm.exporters_from_env()] == [ConsoleSpanExporter]
    clean_env.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    clean_env.setenv("OTEL_TRACES_EXPORTER", "otlp")
    (exp,) = tm.exporters_from_env()
    assert isinstance(exp, OTLPSpanExporter)
    exp.shutdown()
    clean_env.setenv("OTEL_SDK_DISABLED", "true")
    assert tm.exporters_from_env() == []

    s = tm.sampler_from_env()
    assert isinstance(s, ParentBased) and f"{tm.DEFAULT_SAMPLE_RATIO}" in s.get_description()
    clean_env.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    assert isinstance(tm.sampler_from_env(), ParentBased) and "0.25" in tm.sampler_from_env().get_description()
    clean_env.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    assert isinstance(tm.sampler_from_env(), TraceIdRatioBased)
    clean_env.setenv("OTEL_TRACES_SAMPLER", "always_off")
    assert tm.sampler_from_env().get_description() == "AlwaysOffSampler"


def test_setup_tracing_idempotent_and_off_without_exporter(clean_env):
    name = "ssd-test-off"
    assert tm.setup_tracing(name, set_global=False) is None
    assert not tm.tracing_enabled(tm.get_tracer(name))
    clean_env.setenv("OTEL_TRACES_EXPORTER", "console")
    assert tm.setup_tracing(name, set_global=False) is None      # cached: one set-up per process
    name2 = "ssd-test-on"
    p = tm.setup_tracing(name2, set_global=False)
    assert p is not None and tm.setup_tracing(name2, set_global=False) is p
    assert tm.tracing_enabled(tm.get_tracer(name2))
    tm.shutdown()
    assert not tm.tracing_enabled(tm.get_tracer(name2))
