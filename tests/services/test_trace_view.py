"""`ssd trace`: timeline PNG and summary from synthetic spans (saved file, OTLP/JSON, Jaeger
JSON, and received live over OTLP/gRPC)."""
import json
import socket
import subprocess
import sys
import threading

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("grpc")

from ssd.services import trace_view  # noqa: E402
from ssd.services.otlp_receiver import load_spans, save_spans  # noqa: E402
from ssd.services.trace_view import draw_timeline, overlap_ns, summarize  # noqa: E402

MS = 1_000_000
T0 = 1_700_000_000 * 10**9
TID = "ab" * 16
OTHER = "cd" * 16


def _span(name, sid, parent, start_ms, end_ms, service, trace_id=TID, **attrs):
    return {"trace_id": trace_id, "span_id": f"{sid:016x}", "parent_span_id": f"{parent:016x}" if parent else "",
            "name": name, "kind": "INTERNAL", "service": service, "start_ns": T0 + int(start_ms * MS),
            "end_ns": T0 + int(end_ms * MS), "attributes": attrs}


def synthetic():
    s = [_span("ssd.request", 1, 0, 0, 100, "ssd-gateway", **{"ssd.request_id": "r1"}),
         _span("ssd.target.generate", 2, 1, 5, 95, "ssd-target")]
    results = ["miss", "hit", "late", "hit"]
    for r in range(4):  # verify rounds 10-30, 30-50, 50-70, 70-90 ms
        s.append(_span("ssd.verify", 10 + r, 2, 10 + 20 * r, 30 + 20 * r, "ssd-target", **{
            "ssd.round": r, "ssd.accepted_tokens": r, "ssd.cache_result": results[r], "ssd.batch_size": 2}))
    s.append(_span("ssd.index.lookup", 20, 10, 10, 11, "ssd-target"))
    s.append(_span("ssd.jit_draft", 21, 10, 11, 14, "ssd-target"))
    # speculation of round r+1 while round r verifies; two spans of round 2 overlap each other
    s.append(_span("ssd.speculate", 31, 10, 12, 25, "ssd-draft", **{"ssd.round": 1, "ssd.fan_out": 3}))
    s.append(_span("ssd.speculate", 32, 11, 32, 48, "ssd-draft", **{"ssd.round": 2, "ssd.cache_result": "hit"}))
    s.append(_span("ssd.speculate", 33, 11, 45, 55, "ssd-draft", **{"ssd.round": 2}))
    s.append(_span("ssd.speculate", 34, 12, 72, 95, "ssd-draft", **{"ssd.round": 3}))
    # a second, shorter trace
    s.append(_span("ssd.request", 40, 0, 0, 30, "ssd-gateway", trace_id=OTHER))
    s.append(_span("ssd.verify", 41, 40, 5, 25, "ssd-target", trace_id=OTHER, **{"ssd.round": 0, "ssd.cache_result": "hit"}))
    return s


def test_overlap():
    assert overlap_ns([(0, 10)], [(5, 20)]) == 5
    assert overlap_ns([(0, 10), (2, 4), (30, 40)], [(5, 35)]) == 5 + 5
    assert overlap_ns([(0, 10)], [(10, 20)]) == 0
    assert overlap_ns([], [(0, 1)]) == 0


def test_summary_and_png(tmp_path):
    out = tmp_path / "t.png"
    summary = draw_timeline(synthetic(), str(out))  # default: the trace with most rounds
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert summary["trace_id"] == TID
    assert (summary["rounds"], summary["hits"], summary["misses"], summary["late"]) == (4, 2, 1, 1)
    assert summary["accepted_tokens"] == 0 + 1 + 2 + 3
    assert summary["verify_ms"] == pytest.approx(80.0)
    assert summary["speculate_ms"] == pytest.approx(13 + 16 + 10 + 23)
    # speculate union [12,25] [32,55] [72,95] within verify union [10,90]
    assert summary["overlap_ms"] == pytest.approx(13 + 23 + 18)
    assert summary["duration_ms"] == pytest.approx(100.0)

    other = draw_timeline(synthetic(), str(tmp_path / "o.png"), trace_id=OTHER[:8])
    assert (other["trace_id"], other["rounds"], other["hits"], other["overlap_ms"]) == (OTHER, 1, 1, 0.0)
    with pytest.raises(ValueError):
        draw_timeline(synthetic(), str(tmp_path / "x.png"), trace_id="ffff")


def test_summary_falls_back_to_speculate_results():
    spans = [_span("ssd.verify", 1, 9, 0, 10, "ssd-target", **{"ssd.round": 0}),
             _span("ssd.speculate", 2, 1, 0, 5, "ssd-draft", **{"ssd.round": 0, "ssd.cache_result": "late"})]
    assert summarize(spans)["late"] == 1


def test_cli_from_files(tmp_path, capsys):
    spans = synthetic()
    save_spans(spans, tmp_path / "s.json")
    assert load_spans(tmp_path / "s.json") == spans
    assert trace_view.main(["--from", str(tmp_path / "s.json"), "--out", str(tmp_path / "a.png")]) == 0
    assert json.loads(capsys.readouterr().out)["overlap_ms"] == pytest.approx(54.0)
    assert (tmp_path / "a.png").exists()
    assert trace_view.main(["--from", str(tmp_path / "s.json"), "--list"]) == 0
    listed = capsys.readouterr().out
    assert TID in listed and OTHER in listed

    # the same spans as OTLP/JSON and as a Jaeger UI download
    def anyv(v):
        return {"intValue": str(v)} if isinstance(v, int) else {"stringValue": v}
    otlp = {"resourceSpans": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": svc}}]},
                               "scopeSpans": [{"spans": [{
                                   "traceId": s["trace_id"], "spanId": s["span_id"], "parentSpanId": s["parent_span_id"],
                                   "name": s["name"], "kind": 1, "startTimeUnixNano": str(s["start_ns"]),
                                   "endTimeUnixNano": str(s["end_ns"]),
                                   "attributes": [{"key": k, "value": anyv(v)} for k, v in s["attributes"].items()]}
                                   for s in spans if s["service"] == svc]}]}
                              for svc in ("ssd-gateway", "ssd-target", "ssd-draft")]}
    (tmp_path / "otlp.json").write_text(json.dumps(otlp))
    got = {s["span_id"]: s for s in load_spans(tmp_path / "otlp.json")}
    assert got == {s["span_id"]: s for s in spans}
    procs = {"p1": {"serviceName": "ssd-gateway"}, "p2": {"serviceName": "ssd-target"}, "p3": {"serviceName": "ssd-draft"}}
    pid = {"ssd-gateway": "p1", "ssd-target": "p2", "ssd-draft": "p3"}
    jaeger = {"data": [{"traceID": tid, "processes": procs, "spans": [{
        "traceID": tid, "spanID": s["span_id"], "operationName": s["name"], "processID": pid[s["service"]],
        "references": [{"refType": "CHILD_OF", "traceID": tid, "spanID": s["parent_span_id"]}] if s["parent_span_id"] else [],
        "startTime": s["start_ns"] // 1000, "duration": (s["end_ns"] - s["start_ns"]) // 1000,
        "tags": [{"key": k, "type": "int64" if isinstance(v, int) else "string", "value": v} for k, v in s["attributes"].items()]}
        for s in spans if s["trace_id"] == tid]} for tid in (TID, OTHER)]}
    (tmp_path / "jaeger.json").write_text(json.dumps(jaeger))
    got = {s["span_id"]: dict(s, kind="INTERNAL") for s in load_spans(tmp_path / "jaeger.json")}
    assert got == {s["span_id"]: s for s in spans}
    assert trace_view.main(["--from", str(tmp_path / "jaeger.json"), "--out", str(tmp_path / "j.png")]) == 0
    assert json.loads(capsys.readouterr().out)["overlap_ms"] == pytest.approx(54.0)


def test_cli_listen_receives_otlp(tmp_path, capsys):
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    from ssd.services import telemetry as tm

    with socket.socket() as sk:  # a free port for --listen
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    rc = {}
    th = threading.Thread(target=lambda: rc.setdefault("rc", trace_view.main([
        "--listen", str(port), "--seconds", "1.5", "--out", str(tmp_path / "l.png"), "--save", str(tmp_path / "l.json")])))
    th.start()
    p = tm.make_tracer_provider("ssd-target", OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}", insecure=True),
                                sampler=ALWAYS_ON, batch=False)
    t = tm.get_tracer(p)
    with t.start_as_current_span("ssd.request") as root:
        now = tm.now_ns()
        for r in range(3):
            v = tm.round_span(t, "ssd.verify", root, now + r * 10 * MS, now + (r + 1) * 10 * MS,
                              {"ssd.round": r, "ssd.cache_result": "hit"})
            tm.round_span(t, "ssd.speculate", v, now + (r * 10 + 2) * MS, now + (r * 10 + 6) * MS, {"ssd.round": r + 1})
    p.shutdown()
    th.join(timeout=20)
    assert rc["rc"] == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["rounds"], summary["hits"], summary["spans"]) == (3, 3, 7)
    assert summary["overlap_ms"] == pytest.approx(12.0)
    assert len(load_spans(tmp_path / "l.json")) == 7 and (tmp_path / "l.png").exists()


def test_light_import_and_names_match_telemetry():
    code = ("import sys, ssd.services.trace_view\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'opentelemetry', 'grpc', 'matplotlib', 'prometheus_client'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    from ssd.services import telemetry as tm
    for name in ("SERVICE_GATEWAY", "SPAN_VERIFY", "SPAN_SPECULATE", "SPAN_INDEX_LOOKUP", "SPAN_JIT_DRAFT",
                 "ATTR_ROUND", "ATTR_ACCEPTED_TOKENS", "ATTR_CACHE_RESULT"):
        assert getattr(trace_view, name) == getattr(tm, name)
