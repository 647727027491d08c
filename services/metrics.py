"""Prometheus metrics of an ssd service, served on /metrics.

Names follow docs/observability.md: the spec-decode counters are named like
vLLM's (`ssd_spec_decode_*` where vLLM has `vllm:spec_decode_*`) so the usual PromQL carries
over. Each `Metrics` owns its own registry (not prometheus_client's global one), so several
services, or several tests, can live in one process.

    m = Metrics("target")
    port = m.start_http(9100)          # 0: any free port; returns the bound port
    m.record_round(num_draft_tokens=4, accepted=2); m.cache_result("hit"); m.observe_step(0.012)

Every service registers every metric; a service leaves at zero those that are not its own
(the draft role does not record request latencies, the gateway no draft queue).
"""
from __future__ import annotations

import threading
import urllib.request

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

ROLES = ("gateway", "target", "draft")
CACHE_RESULTS = ("hit", "miss", "late")
SPECULATION_SOURCES = ("cache", "index", "jit", "backup")  # where a verified speculation came from
FINISH_REASONS = ("stop", "length")  # pre-created; any other reason (abort, error) appears when used

# Buckets in seconds, from sub-millisecond GPU steps to multi-second CPU requests.
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
                0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RATE_BUCKETS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 350, 500, 1000, 2000, 5000)  # committed tokens per second
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25,
               0.5, 1.0, 2.5, 5.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    """The metric set of one service process (role: gateway | target | draft)."""

    def __init__(self, role: str, registry: CollectorRegistry | None = None, num_speculative_tokens: int = 0):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.role = role
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.num_drafts = Counter("ssd_spec_decode_num_drafts", "Draft rounds verified (one per sequence and round)", registry=r)
        self.num_draft_tokens = Counter("ssd_spec_decode_num_draft_tokens", "Speculated tokens proposed for verification", registry=r)
        self.num_accepted_tokens = Counter("ssd_spec_decode_num_accepted_tokens", "Speculated tokens accepted by the target", registry=r)
        self.num_accepted_tokens_per_pos = Counter(
            "ssd_spec_decode_num_accepted_tokens_per_pos",
            "Accepted speculated tokens by position in the speculation (0 = first)", ["position"], registry=r)
        self.speculation_cache = Counter(
            "ssd_speculation_cache", "Speculation-cache lookups by result: hit, miss (no matching branch), "
            "late (the draft had not published in time)", ["result"], registry=r)
        self.speculation_source = Counter(
            "ssd_speculation_source", "Verified speculations by where they came from: cache (the draft's speculation "
            "cache), index (another target's published speculation), jit (the draft just in time, after a miss or in "
            "SD), backup (the fast n-gram backup: a miss at or above b*, or no draft)", ["source"], registry=r)
        self.prompt_tokens = Counter("ssd_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("ssd_generation_tokens", "Generated tokens of finished requests", registry=r)
        self.request_success = Counter("ssd_request_success", "Finished requests by finish reason", ["finish_reason"], registry=r)
        self.num_requests_running = Gauge("ssd_num_requests_running", "Requests being decoded", registry=r)
        self.num_requests_waiting = Gauge("ssd_num_requests_waiting", "Requests queued, not yet admitted", registry=r)
        self.draft_queue_depth = Gauge("ssd_draft_queue_depth", "Sequences waiting for the draft to speculate", registry=r)
        self.step_duration = Histogram(
            "ssd_step_duration_seconds", "One engine step: target verify step, or draft speculation-cache build",
            ["role"], buckets=STEP_BUCKETS, registry=r)
        # the speculation length the target chose per sequence and round (adaptive K; 0: a plain
        # decode row), one bucket per length
        self.speculation_length = Histogram(
            "ssd_speculation_length", "Draft tokens verified per sequence and round: the speculation length "
            "chosen (0 = a plain decode row)", buckets=tuple(range(max(num_speculative_tokens, 16) + 1)), registry=r)
        # adaptive speculation: what each step's plan expected (committed tokens per second) and what
        # the step realised, and whether the gate let the step speculate at all
        self.predicted_rate = Histogram(
            "ssd_speculation_predicted_tokens_per_second", "Committed tokens per second an adaptive step's plan "
            "expected (its speculation lengths maximise it)", buckets=RATE_BUCKETS, registry=r)
        self.realised_rate = Histogram(
            "ssd_speculation_realised_tokens_per_second", "Committed tokens per second an adaptive step realised "
            "(draft wait, verify and cache wait included)", buckets=RATE_BUCKETS, registry=r)
        self.gate_steps = Counter(
            "ssd_speculation_gate_steps", "Adaptive steps by the gate's arm: spec (speculation planned) or plain "
            "(every row decoded plainly: speculation measured not to pay at this load)", ["arm"], registry=r)
        self.fan_out_duration = Histogram(
            "ssd_fan_out_duration_seconds", "Draft fork and tree build of one round (fan-out)", buckets=STEP_BUCKETS, registry=r)
        self.jit_draft_duration = Histogram(
            "ssd_jit_draft_duration_seconds", "Just-in-time draft after a speculation-cache miss", buckets=STEP_BUCKETS, registry=r)
        self.time_to_first_token = Histogram(
            "ssd_time_to_first_token_seconds", "Time from request arrival to its first token", buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "ssd_inter_token_latency_seconds", "Time between consecutive output tokens of a request", buckets=ITL_BUCKETS, registry=r)
        self.request_latency = Histogram(
            "ssd_request_latency_seconds", "Time from request arrival to its end", buckets=REQUEST_BUCKETS, registry=r)
        # series that exist from the start, so rate() and ratios have both sides at zero
        for res in CACHE_RESULTS:
            self.speculation_cache.labels(result=res)
        for src in SPECULATION_SOURCES:
            self.speculation_source.labels(source=src)
        for reason in FINISH_REASONS:
            self.request_success.labels(finish_reason=reason)
        self._step = self.step_duration.labels(role=role)
        self._pos: list = []
        self._pos_lock = threading.Lock()
        self._pos_counter(num_speculative_tokens - 1)
        self._httpd = None

    # --- recording ----------------------------------------------------------------------

    def _pos_counter(self, pos: int):
        if pos >= len(self._pos):
            with self._pos_lock:
                while len(self._pos) <= pos:
                    self._pos.append(self.num_accepted_tokens_per_pos.labels(position=str(len(self._pos))))
        return self._pos[pos] if pos >= 0 else None

    def record_round(self, num_draft_tokens: int, accepted: int) -> None:
        """One verified draft round of one sequence: `num_draft_tokens` proposed, the first
        `accepted` of them accepted (the bonus/corrected token is not counted)."""
        if not 0 <= accepted <= num_draft_tokens:
            raise ValueError(f"accepted={accepted} outside 0..{num_draft_tokens}")
        self.num_drafts.inc()
        self.num_draft_tokens.inc(num_draft_tokens)
        if accepted:
            self.num_accepted_tokens.inc(accepted)
            self._pos_counter(accepted - 1)
            for p in range(accepted):
                self._pos[p].inc()

    def cache_result(self, result: str, n: int = 1) -> None:
        if result not in CACHE_RESULTS:
            raise ValueError(f"cache result must be one of {CACHE_RESULTS}, got {result!r}")
        self.speculation_cache.labels(result=result).inc(n)

    def speculation_from(self, source: str) -> None:
        """One verified speculation of one sequence, taken from `source`."""
        if source not in SPECULATION_SOURCES:
            raise ValueError(f"speculation source must be one of {SPECULATION_SOURCES}, got {source!r}")
        self.speculation_source.labels(source=source).inc()

    def observe_step(self, seconds: float) -> None:
        self._step.observe(seconds)

    def observe_length(self, drafted: int) -> None:
        """One sequence's round verified `drafted` speculated tokens (0: decoded plainly)."""
        self.speculation_length.observe(drafted)

    def observe_rates(self, arm: str | None, predicted: float | None, realised: float | None) -> None:
        """An adaptive step: the gate's arm, its plan's expected (None: no plan) and its realised
        committed tokens per second. arm None: not an adaptive step, nothing to record."""
        if arm is None:
            return
        self.gate_steps.labels(arm=arm).inc()
        if realised is not None:
            self.realised_rate.observe(realised)
        if predicted is not None:
            self.predicted_rate.observe(predicted)

    def observe_fan_out(self, seconds: float) -> None:
        self.fan_out_duration.observe(seconds)

    def observe_jit(self, seconds: float) -> None:
        self.jit_draft_duration.observe(seconds)

    def observe_ttft(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        self.inter_token_latency.observe(seconds)

    def request_finished(self, reason: str, prompt_tokens: int, generation_tokens: int, latency_s: float) -> None:
        self.request_success.labels(finish_reason=reason or "unknown").inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        self.request_latency.observe(latency_s)

    def set_running(self, n: int) -> None:
        self.num_requests_running.set(n)

    def set_waiting(self, n: int) -> None:
        self.num_requests_waiting.set(n)

    def set_draft_queue(self, n: int) -> None:
        self.draft_queue_depth.set(n)

    # --- exposition ---------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of a scrape, for serving /metrics from an existing HTTP server."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def start_http(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics on host:port in a daemon thread (port 0: any free one); returns the
        bound port. One server per Metrics."""
        if self._httpd is not None:
            return self._httpd.server_port
        httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._httpd = httpd
        return httpd.server_port

    @property
    def http_port(self) -> int | None:
        return self._httpd.server_port if self._httpd is not None else None

    def stop_http(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


# --- reading a scrape back (tests, tools) ------------------------------------------------------

def parse(text: str) -> dict[str, dict[tuple, float]]:
    """Exposition text as {sample name: {sorted (label, value) pairs: value}}, e.g.
    parse(t)["ssd_speculation_cache_total"][(("result", "hit"),)]."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def sample(parsed: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    """One sample's value from `parse` output (0.0 when absent)."""
    return parsed.get(name, {}).get(tuple(sorted((k, str(v)) for k, v in labels.items())), 0.0)


def scrape(url: str, timeout: float = 5.0) -> dict[str, dict[tuple, float]]:
    """GET url (…/metrics) and parse it."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return parse(r.read().decode())
