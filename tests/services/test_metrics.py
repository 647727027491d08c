"""Prometheus metrics: a known sequence of rounds scraped over real HTTP gives consistent
spec-decode counters; registries are per instance."""
import random
import urllib.request

import pytest

pytest.importorskip("prometheus_client")

from ssd.services.metrics import CACHE_RESULTS, Metrics, parse, sample, scrape  # noqa: E402

NAMES = [
    "ssd_spec_decode_num_drafts_total", "ssd_spec_decode_num_draft_tokens_total",
    "ssd_spec_decode_num_accepted_tokens_total", "ssd_spec_decode_num_accepted_tokens_per_pos_total",
    "ssd_speculation_cache_total", "ssd_speculation_source_total", "ssd_prompt_tokens_total", "ssd_generation_tokens_total",
    "ssd_request_success_total", "ssd_num_requests_running", "ssd_num_requests_waiting", "ssd_draft_queue_depth",
    "ssd_step_duration_seconds_bucket", "ssd_fan_out_duration_seconds_bucket", "ssd_jit_draft_duration_seconds_bucket",
    "ssd_time_to_first_token_seconds_bucket", "ssd_inter_token_latency_seconds_bucket",
    "ssd_request_latency_seconds_bucket", "ssd_speculation_length_bucket",
]


@pytest.fixture
def target():
    m = Metrics("target", num_speculative_tokens=4)
    port = m.start_http(0, host="127.0.0.1")
    yield m, f"http://127.0.0.1:{port}/metrics"
    m.stop_http()


def test_counters_consistent_over_http(target):
    m, url = target
    rng = random.Random(0)
    k = 4
    rounds = [(k, rng.randint(0, k)) for _ in range(200)] + [(2, 2), (6, 5)]  # k may vary per round
    results = [rng.choice(CACHE_RESULTS) for _ in rounds]
    for (n, a), res in zip(rounds, results):
        m.observe_length(n)
        m.record_round(n, a)
        m.cache_result(res)
        m.observe_step(0.004)
    m.request_finished("length", prompt_tokens=10, generation_tokens=64, latency_s=1.5)
    m.request_finished("stop", prompt_tokens=7, generation_tokens=3, latency_s=0.2)
    m.observe_ttft(0.05)
    for _ in range(5):
        m.observe_itl(0.02)
    m.set_running(3)
    m.set_waiting(1)

    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    got = parse(text)
    for name in NAMES:
        assert name in got, name

    assert sample(got, "ssd_spec_decode_num_drafts_total") == len(rounds)
    assert sample(got, "ssd_spec_decode_num_draft_tokens_total") == sum(n for n, _ in rounds)
    accepted = sample(got, "ssd_spec_decode_num_accepted_tokens_total")
    assert accepted == sum(a for _, a in rounds)
    per_pos = [sample(got, "ssd_spec_decode_num_accepted_tokens_per_pos_total", position=p) for p in range(6)]
    assert per_pos == [sum(a > p for _, a in rounds) for p in range(6)]
    assert all(x >= y for x, y in zip(per_pos, per_pos[1:]))
    assert sum(per_pos) == accepted
    assert per_pos[0] <= sample(got, "ssd_spec_decode_num_drafts_total")
    for res in CACHE_RESULTS:
        assert sample(got, "ssd_speculation_cache_total", result=res) == results.count(res)
    assert sample(got, "ssd_step_duration_seconds_count", role="target") == len(rounds)
    assert sample(got, "ssd_step_duration_seconds_bucket", role="target", le="0.005") == len(rounds)
    assert sample(got, "ssd_step_duration_seconds_bucket", role="target", le="0.0025") == 0
    assert sample(got, "ssd_request_success_total", finish_reason="length") == 1
    assert sample(got, "ssd_request_success_total", finish_reason="stop") == 1
    assert sample(got, "ssd_prompt_tokens_total") == 17 and sample(got, "ssd_generation_tokens_total") == 67
    assert sample(got, "ssd_request_latency_seconds_sum") == pytest.approx(1.7)
    assert sample(got, "ssd_inter_token_latency_seconds_count") == 5
    assert sample(got, "ssd_time_to_first_token_seconds_count") == 1
    assert sample(got, "ssd_num_requests_running") == 3 and sample(got, "ssd_num_requests_waiting") == 1
    # the chosen speculation lengths, one bucket per length
    for le in range(8):
        assert sample(got, "ssd_speculation_length_bucket", le=f"{le:.1f}") == sum(n <= le for n, _ in rounds)
    assert sample(got, "ssd_speculation_length_sum") == sum(n for n, _ in rounds)

    # derived quantities as the docs' PromQL computes them
    assert 0 < accepted / sample(got, "ssd_spec_decode_num_draft_tokens_total") < 1
    assert scrape(url) == got  # nothing changed in between


def test_zero_series_exist_and_registries_are_separate():
    a, b = Metrics("draft"), Metrics("target")
    a.cache_result("late", 3)
    a.set_draft_queue(5)
    a.observe_fan_out(0.01)
    a.observe_jit(0.002)
    a.observe_step(0.02)
    pa, pb = parse(a.render()[0].decode()), parse(b.render()[0].decode())
    assert sample(pa, "ssd_speculation_cache_total", result="late") == 3
    assert sample(pb, "ssd_speculation_cache_total", result="late") == 0
    assert (("result", "hit"),) in pb["ssd_speculation_cache_total"]   # pre-created at zero
    for src in ("cache", "index", "jit", "backup"):
        assert sample(pb, "ssd_speculation_source_total", source=src) == 0
        assert (("source", src),) in pb["ssd_speculation_source_total"]
    b.speculation_from("backup")
    b.speculation_from("backup")
    b.speculation_from("jit")
    pb = parse(b.render()[0].decode())
    assert sample(pb, "ssd_speculation_source_total", source="backup") == 2
    assert sample(pb, "ssd_speculation_source_total", source="jit") == 1
    assert sample(pa, "ssd_draft_queue_depth") == 5
    assert sample(pa, "ssd_step_duration_seconds_count", role="draft") == 1
    assert sample(pa, "ssd_fan_out_duration_seconds_count") == 1 and sample(pa, "ssd_jit_draft_duration_seconds_count") == 1
    assert "ssd_spec_decode_num_accepted_tokens_per_pos_total" not in pb  # no positions before any round


def test_bad_input_and_port_zero():
    m = Metrics("gateway")
    with pytest.raises(ValueError):
        m.record_round(2, 3)
    with pytest.raises(ValueError):
        m.cache_result("maybe")
    with pytest.raises(ValueError):
        m.speculation_from("none")
    with pytest.raises(ValueError):
        Metrics("router")
    p1 = m.start_http(0, host="127.0.0.1")
    assert p1 > 0 and m.start_http(0) == p1 == m.http_port
    m2 = Metrics("gateway")
    p2 = m2.start_http(0, host="127.0.0.1")
    assert p2 != p1
    for x in (m, m2):
        x.stop_http()


def test_inter_token_gaps_spread_a_round_over_its_tokens():
    from ssd.services.gateway.server import inter_token_gaps

    # a round committing 4 tokens 0.2 s after the previous response: four gaps of 0.05 s
    assert inter_token_gaps(4, 0.2, first=False) == [0.05] * 4
    # the first response: its first token is the TTFT; the 2 that came with it share the interval
    assert inter_token_gaps(3, 0.3, first=True) == [0.15, 0.15]
    assert inter_token_gaps(1, 0.3, first=True) == []
    # a request's gaps add up to its time from first to last token
    rounds = [(1, 0.5), (3, 0.09), (1, 0.04), (5, 0.1)]
    gaps = [g for i, (n, dt) in enumerate(rounds) for g in inter_token_gaps(n, dt, i == 0)]
    assert len(gaps) == 9 and abs(sum(gaps) - 0.23) < 1e-12


def test_adaptive_steps_export_the_gates_arm_and_predicted_vs_realised_rates(target):
    """TargetObserver.on_step with adaptive StepRecords: the gate's arm counted per step, the
    plan's predicted and the realised committed tokens/s as histograms (a plain step has no plan;
    a non-adaptive step records nothing of either)."""
    from ssd.engine.base import StepRecord
    from ssd.services.observe import TargetObserver
    from opentelemetry.trace import NoOpTracer

    m, url = target
    obs = TargetObserver(NoOpTracer(), m)
    steps = [("spec", 40.0, 31.0), ("spec", 55.0, 60.0), ("plain", None, 18.0), ("spec", None, 20.0), (None, None, None)]
    for i, (arm, predicted, realised) in enumerate(steps):
        obs.on_step(StepRecord(i, 0, 1_000_000, [], gate_arm=arm, predicted_tps=predicted, realised_tps=realised))
    got = parse(urllib.request.urlopen(url).read().decode())
    assert sample(got, "ssd_speculation_gate_steps_total", arm="spec") == 3
    assert sample(got, "ssd_speculation_gate_steps_total", arm="plain") == 1
    assert sample(got, "ssd_speculation_predicted_tokens_per_second_count") == 2
    assert sample(got, "ssd_speculation_predicted_tokens_per_second_sum") == pytest.approx(95.0)
    assert sample(got, "ssd_speculation_realised_tokens_per_second_count") == 4
    assert sample(got, "ssd_speculation_realised_tokens_per_second_sum") == pytest.approx(129.0)
