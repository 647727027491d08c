"""Tracing and metrics end to end: the three real services, as separate processes configured only by the
standard OTEL_* environment, export spans to an in-process OTLP receiver over gRPC; their
Prometheus /metrics are scraped over HTTP. Checked against the tokens actually produced."""
import json
import os
import urllib.request

import grpc
import pytest

from ssd.services.common import CHANNEL_OPTIONS
from ssd.services.metrics import sample, scrape
from ssd.services.otlp_receiver import OTLPReceiver
from ssd.services.protos import pb, pb_grpc
from ssd.services.run import start_stack, stop_stack

pytestmark = pytest.mark.slow

# every step speculates (--no-gate): these tests follow each round through the draft; a step the
# gate keeps plain involves no draft (its spans are checked in test_gated_steps_say_so_on_their_spans)
COMMON = ["--max-batch", "4", "--max-model-len", "512", "--metrics-port", "0", "--no-gate"]
PROMPTS = ["Name three colours.", "Count from one to five."]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def traced_stack(real_target_path):
    rx = OTLPReceiver().start()
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=rx.endpoint, OTEL_BSP_SCHEDULE_DELAY="200",
               OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="1.0")
    procs = []
    try:
        ports = start_stack(COMMON, procs, env=env, http_port=0)
        stub = pb_grpc.GatewayStub(grpc.insecure_channel(f"127.0.0.1:{ports['gateway']['port']}", options=CHANNEL_OPTIONS))
        finals = []
        for prompt in PROMPTS:
            req = pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=prompt)]),
                                     sampling=pb.SamplingParams(max_tokens=MAX_TOKENS))
            chunks = list(stub.Generate(req, timeout=600))
            finals.append(chunks[-1])
        # over HTTP, inside a trace the client already started (W3C traceparent header)
        client_trace, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        body = json.dumps({"prompt": "Hello", "max_tokens": 12, "temperature": 0}).encode()
        http = urllib.request.Request(f"http://127.0.0.1:{ports['gateway']['http_port']}/v1/completions", data=body,
                                      headers={"content-type": "application/json",
                                               "traceparent": f"00-{client_trace}-{client_span}-01"})
        with urllib.request.urlopen(http, timeout=600) as r:
            http_resp = json.loads(r.read())
        expected_rounds = sum(f.stats.num_rounds for f in finals)
        rx.wait_for(lambda spans: _settled(spans, expected_rounds), timeout=60)
        metrics = {role: scrape(f"http://127.0.0.1:{ports[role]['metrics_port']}/metrics") for role in ports}
        yield {"rx": rx, "finals": finals, "metrics": metrics, "http": http_resp,
               "client": (client_trace, client_span)}
    finally:
        stop_stack(procs)
        rx.stop()


def _settled(spans, expected_rounds: int) -> bool:
    """Every process has exported what the tests read: each process's batch exporter sends on its
    own schedule, so the gateway's spans of a request can arrive before the target's, and the
    target's verify spans before the draft's speculate spans of the same rounds."""
    names = [s["name"] for s in spans]
    verify = [s for s in spans if s["name"] == "ssd.verify"]
    drafted = sum(s["attributes"].get("ssd.speculation_source") != "none" for s in verify)
    return (len(verify) >= expected_rounds and names.count("ssd.request") >= 3 and names.count("ssd.target.run") >= 3
            and names.count("ssd.speculate") >= drafted)


@pytest.fixture(scope="module")
def real_target_path():
    from ssd.models.loader import default_target_path

    return default_target_path()


def _by_trace(spans):
    out = {}
    for s in spans:
        out.setdefault(s["trace_id"], []).append(s)
    return out


def test_one_trace_per_request_across_gateway_target_and_draft(traced_stack):
    spans = traced_stack["rx"].spans()
    roots = [s for s in spans if s["name"] == "ssd.request"]
    assert len(roots) == len(PROMPTS) + 1
    traces = _by_trace(spans)
    with_draft = 0
    for root in roots:
        trace = traces[root["trace_id"]]
        # the draft joins a request's trace in the rounds it is asked for: adaptive K may plan
        # every round of a short request plain where the measured verify cost says drafting
        # would not pay, and then the draft never hears of it
        drafted = any(s["name"] == "ssd.verify" and s["attributes"]["ssd.speculation_source"] != "none" for s in trace)
        services = {s["service"] for s in trace}
        assert {"ssd-gateway", "ssd-target"} <= services <= {"ssd-gateway", "ssd-target", "ssd-draft"}
        assert "ssd-draft" in services or not drafted
        with_draft += "ssd-draft" in services
        assert sum(s["name"] == "ssd.request" for s in trace) == 1
        # the HTTP request joined the client's trace: one SERVER span, ssd.request inside it
        if root["trace_id"] == traced_stack["client"][0]:
            servers = [s for s in trace if s["kind"] == "SERVER" and s["service"] == "ssd-gateway"]
            assert [s["name"] for s in servers] == ["POST /v1/completions"]
            assert servers[0]["parent_span_id"] == traced_stack["client"][1]
            assert servers[0]["attributes"]["http.request.method"] == "POST"
            assert servers[0]["attributes"]["http.response.status_code"] == 200
            assert root["parent_span_id"] == servers[0]["span_id"] and root["kind"] == "INTERNAL"
            assert root["attributes"]["http.route"] == "/v1/completions" and "rpc.system" not in root["attributes"]
        else:
            assert root["parent_span_id"] == ""
            assert root["attributes"]["rpc.method"] == "Generate" and "http.route" not in root["attributes"]
    assert with_draft >= 1  # the draft's spans join the traces of the requests it worked for
    assert traced_stack["client"][0] in {r["trace_id"] for r in roots}


def test_every_round_has_verify_and_speculate_spans_with_correct_parents(traced_stack):
    spans = traced_stack["rx"].spans()
    traces = _by_trace(spans)
    grpc_roots = [s for s in spans if s["name"] == "ssd.request" and s["trace_id"] != traced_stack["client"][0]]
    assert len(grpc_roots) == len(traced_stack["finals"])
    for root, final in zip(sorted(grpc_roots, key=lambda s: s["start_ns"]), traced_stack["finals"]):
        trace = traces[root["trace_id"]]
        runs = [s for s in trace if s["name"] == "ssd.target.run"]
        calls = [s for s in trace if s["name"] == "ssd.v1.Target/Run"]  # the gateway's CLIENT span
        assert len(runs) == 1 and len(calls) == 1
        assert calls[0]["parent_span_id"] == root["span_id"] and runs[0]["parent_span_id"] == calls[0]["span_id"]
        run_id = runs[0]["span_id"]
        verify = sorted((s for s in trace if s["name"] == "ssd.verify"), key=lambda s: s["attributes"]["ssd.round"])
        speculate = [s for s in trace if s["name"] == "ssd.speculate"]
        exchanges = [s for s in trace if s["name"] == "ssd.v1.Draft/Speculate"]
        assert all(s["parent_span_id"] == run_id for s in verify + speculate + exchanges)
        assert all(s["service"] == "ssd-draft" for s in speculate)
        # one verify span per round; the draft built a speculation cache during every one that
        # verified a speculation (the step's plan may leave a row plain: an n-gram backup that
        # does not pay is cut to nothing, docs/algorithm.md 7e; adaptive K gives a row no draft
        # where the measured verify cost says it would not pay, so how many rounds draft depends
        # on the machine: some do, from the first rounds' prior on)
        assert len(verify) == final.stats.num_rounds
        spec_rounds = {s["attributes"]["ssd.round"] for s in speculate}
        drafted = {s["attributes"]["ssd.round"] for s in verify if s["attributes"]["ssd.speculation_source"] != "none"}
        assert drafted <= spec_rounds and drafted
        for s in verify:  # the verify window sits inside the request
            assert root["start_ns"] <= s["start_ns"] <= s["end_ns"] <= root["end_ns"]
        # children: JIT drafts and index lookups hang off their round's exchange with the draft
        exchange_ids = {s["span_id"] for s in exchanges}
        children = [s for s in trace if s["name"] in ("ssd.jit_draft", "ssd.index.lookup") and s["service"] == "ssd-target"]
        assert children and all(c["parent_span_id"] in exchange_ids for c in children)


def test_every_child_lies_inside_its_parent(traced_stack):
    """One clock (epoch ns) in every process, and each span recorded under a parent whose window
    holds it: no slack allowed."""
    spans = traced_stack["rx"].spans()
    by_id = {s["span_id"]: s for s in spans}
    edges = [(s, by_id[s["parent_span_id"]]) for s in spans if s["parent_span_id"] in by_id]
    assert len(edges) > 20 and {c["name"] for c, _ in edges} >= {
        "ssd.verify", "ssd.speculate", "ssd.jit_draft", "ssd.index.lookup", "ssd.target.run", "ssd.v1.Target/Run",
        "ssd.v1.Target/Load", "ssd.v1.Draft/Speculate"}
    last_round = {}  # trace -> the request's final round
    for sp in spans:
        if sp["name"] == "ssd.verify":
            last_round[sp["trace_id"]] = max(last_round.get(sp["trace_id"], 0), sp["attributes"]["ssd.round"])

    def unawaited(c, p) -> bool:
        """The draft's cache build of a request's final round: nobody waits for it (the request
        is finished), so it may end after the target's span of the request; it still starts
        inside it."""
        return (c["name"] == "ssd.speculate" and c["attributes"]["ssd.round"] == last_round.get(c["trace_id"])
                and p["start_ns"] <= c["start_ns"] <= p["end_ns"])

    outside = [(c["name"], p["name"], c["attributes"].get("ssd.round"), c["start_ns"] - p["start_ns"], p["end_ns"] - c["end_ns"])
               for c, p in edges if not p["start_ns"] <= c["start_ns"] <= c["end_ns"] <= p["end_ns"] and not unawaited(c, p)]
    assert not outside, outside[:10]


def test_rounds_are_each_sequences_own(traced_stack):
    """ssd.round counts 1, 2, 3, ... per request on the target and on the draft; ssd.step is the
    target's step counter, shared by the sequences of a batch."""
    spans = traced_stack["rx"].spans()
    traces = _by_trace(spans)
    roots = sorted((s for s in spans if s["name"] == "ssd.request" and s["trace_id"] != traced_stack["client"][0]),
                   key=lambda s: s["start_ns"])
    for root, final in zip(roots, traced_stack["finals"]):
        trace = traces[root["trace_id"]]
        verify = sorted((s for s in trace if s["name"] == "ssd.verify"), key=lambda s: s["start_ns"])
        assert [s["attributes"]["ssd.round"] for s in verify] == list(range(1, final.stats.num_rounds + 1))
        steps = [s["attributes"]["ssd.step"] for s in verify]
        assert steps == sorted(set(steps))
        speculate = [s["attributes"] for s in trace if s["name"] == "ssd.speculate"]
        assert speculate and {a["ssd.round"] for a in speculate} <= set(range(1, final.stats.num_rounds + 1))
        # the draft's round r is the target's round r: the same step
        step_of = {s["attributes"]["ssd.round"]: s["attributes"]["ssd.step"] for s in verify}
        assert all(step_of[a["ssd.round"]] == a["ssd.step"] for a in speculate)


def test_span_kinds_and_semantic_convention_attributes(traced_stack):
    spans = traced_stack["rx"].spans()
    by_name = {}
    for s in spans:
        by_name.setdefault(s["name"], []).append(s)
    for root in by_name["ssd.request"]:
        a = root["attributes"]
        http = root["trace_id"] == traced_stack["client"][0]  # under the HTTP request's SERVER span
        assert root["kind"] == ("INTERNAL" if http else "SERVER") and a["gen_ai.system"] == a["gen_ai.provider.name"] == "ssd"
        assert a["gen_ai.request.model"] == "smollm2-135m-instruct" and a["gen_ai.usage.input_tokens"] > 0
        assert a["gen_ai.usage.output_tokens"] == a["ssd.completion_tokens"]
        assert list(a["gen_ai.response.finish_reasons"]) == [a["ssd.finish_reason"]]
        assert {"gen_ai.request.max_tokens", "gen_ai.request.temperature", "gen_ai.request.top_p"} <= set(a)
    grpc_roots = [r["attributes"] for r in by_name["ssd.request"] if r["trace_id"] != traced_stack["client"][0]]
    assert all(a["gen_ai.operation.name"] == "chat" and a["rpc.system"] == "grpc" and a["rpc.service"] == "ssd.v1.Gateway"
               and a["rpc.method"] == "Generate" and a["rpc.grpc.status_code"] == 0 for a in grpc_roots)
    assert len(grpc_roots) == len(PROMPTS)
    for name, service, method in (("ssd.v1.Target/Run", "ssd.v1.Target", "Run"), ("ssd.v1.Target/Load", "ssd.v1.Target", "Load"),
                                  ("ssd.v1.Draft/Load", "ssd.v1.Draft", "Load"), ("ssd.v1.Draft/Speculate", "ssd.v1.Draft", "Speculate")):
        assert by_name[name], name
        for s in by_name[name]:
            a = s["attributes"]
            assert s["kind"] == "CLIENT" and a["rpc.system"] == "grpc" and (a["rpc.service"], a["rpc.method"]) == (service, method)
            assert a["server.address"] == "127.0.0.1" and a["server.port"] > 0 and a["rpc.grpc.status_code"] == 0
    for run in by_name["ssd.target.run"]:
        a = run["attributes"]
        assert run["kind"] == "SERVER" and (a["rpc.service"], a["rpc.method"], a["rpc.grpc.status_code"]) == ("ssd.v1.Target", "Run", 0)
    # adaptive (the default): each round says whether its step speculated, what it realised, and
    # (once costs are measured) what the step's plan expected
    verify = [s["attributes"] for s in by_name["ssd.verify"]]
    assert all(a["ssd.speculating"] is True and a["ssd.realised_tokens_per_s"] > 0 for a in verify)
    assert sum("ssd.predicted_tokens_per_s" in a for a in verify) > len(verify) / 2


def test_span_attributes_agree_with_the_tokens_produced(traced_stack):
    spans = traced_stack["rx"].spans()
    traces = _by_trace(spans)
    grpc_roots = sorted((s for s in spans if s["name"] == "ssd.request" and s["trace_id"] != traced_stack["client"][0]),
                        key=lambda s: s["start_ns"])
    for root, final in zip(grpc_roots, traced_stack["finals"]):
        verify = [s["attributes"] for s in traces[root["trace_id"]] if s["name"] == "ssd.verify"]
        # every output token but the prefill's was committed by some round
        assert sum(a["ssd.committed_tokens"] for a in verify) == final.usage.completion_tokens - 1
        assert sum(a["ssd.accepted_tokens"] for a in verify) == final.stats.num_accepted_tokens
        assert sum(a["ssd.num_speculative_tokens"] for a in verify) == final.stats.num_draft_tokens
        assert {a["ssd.cache_result"] for a in verify} <= {"hit", "miss", "late"}
        assert sum(a["ssd.cache_result"] in ("hit", "late") for a in verify) == final.stats.cache_hit + final.stats.cache_late
        assert root["attributes"]["ssd.completion_tokens"] == final.usage.completion_tokens


def test_metrics_are_consistent_with_what_was_generated(traced_stack):
    m, finals = traced_stack["metrics"], traced_stack["finals"]
    http_tokens = traced_stack["http"]["usage"]["completion_tokens"]
    t, g, d = m["target"], m["gateway"], m["draft"]
    accepted = sum(f.stats.num_accepted_tokens for f in finals)
    drafted = sum(f.stats.num_draft_tokens for f in finals)
    # target: spec-decode counters (the HTTP request's rounds are counted too: compare with >=)
    assert sample(t, "ssd_spec_decode_num_accepted_tokens_total") >= accepted > 0
    assert sample(t, "ssd_spec_decode_num_draft_tokens_total") >= drafted
    per_pos = [sample(t, "ssd_spec_decode_num_accepted_tokens_per_pos_total", position=i) for i in range(4)]
    assert per_pos == sorted(per_pos, reverse=True) and sum(per_pos) == sample(t, "ssd_spec_decode_num_accepted_tokens_total")
    cache = {r: sample(t, "ssd_speculation_cache_total", result=r) for r in ("hit", "miss", "late")}
    assert cache["hit"] + cache["late"] >= sum(f.stats.cache_hit + f.stats.cache_late for f in finals)
    assert sample(t, "ssd_num_requests_running") == 0
    assert sample(t, "ssd_step_duration_seconds_count", role="target") > 0
    # gateway: requests and tokens, TTFT once per request
    total_tokens = sum(f.usage.completion_tokens for f in finals) + http_tokens
    assert sample(g, "ssd_generation_tokens_total") == total_tokens
    finished = sum(sample(g, "ssd_request_success_total", finish_reason=r) for r in ("stop", "length"))
    assert finished == len(finals) + 1
    assert sample(g, "ssd_time_to_first_token_seconds_count") == len(finals) + 1
    assert sample(g, "ssd_inter_token_latency_seconds_count") == total_tokens - (len(finals) + 1)
    # draft: one fan-out build per round served, queue empty at rest
    assert sample(d, "ssd_fan_out_duration_seconds_count") > 0
    assert sample(d, "ssd_draft_queue_depth") == 0


def test_trace_timeline_png_from_the_received_spans(traced_stack, tmp_path):
    """`ssd trace --from` on what the services exported: the picture and its numbers."""
    from ssd.cli import main as ssd_main
    from ssd.services.trace_view import draw_timeline

    spans = traced_stack["rx"].spans()
    saved = tmp_path / "spans.json"
    traced_stack["rx"].save_json(saved)
    out = tmp_path / "timeline.png"
    assert ssd_main(["trace", "--from", str(saved), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    root = min((s for s in spans if s["name"] == "ssd.request" and s["trace_id"] != traced_stack["client"][0]),
               key=lambda s: s["start_ns"])
    summary = draw_timeline(spans, str(tmp_path / "one.png"), trace_id=root["trace_id"])
    assert summary["rounds"] == traced_stack["finals"][0].stats.num_rounds
    assert summary["overlap_ms"] > 0  # drafting ran while the target verified
