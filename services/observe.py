"""Core round records -> OpenTelemetry spans and Prometheus metrics.

The core engines know nothing of tracing: after each batched verify step the target engine
hands over a StepRecord (ssd/engine/base.py) and after each round the draft's RoundServer a
round dict (ssd/engine/draft_worker.py). A batched step serves many requests at once, so each
sequence's round becomes its own already-finished span, parented on that sequence's trace
context (the traceparent that came with the request), with the step's real start and end
times. Untraced or unsampled sequences cost one flag check.
"""
from __future__ import annotations

from opentelemetry.trace import SpanKind

from ssd.config import RequestOptions
from ssd.engine.sequence import Source

from . import telemetry as tm

NO_OPTIONS = RequestOptions()  # a sequence the draft no longer knows

# the target's rounds travel to the draft over this long-lived bidirectional stream: each
# sequence's round on it is traced as one client call
DRAFT_ROUND_METHOD = "/ssd.v1.Draft/Speculate"


class TargetObserver:
    """engine.on_step: per sequence and round, an `ssd.verify` span and, when a draft takes
    part, a CLIENT span for the round's exchange with it (`ssd.v1.Draft/Speculate`: from the
    JIT request or the verify to the end of the cache lookup) holding the `ssd.jit_draft` and
    `ssd.index.lookup` spans; and the spec-decode counters. All are children of the sequence's
    `ssd.target.run` span, each inside its parent: one clock (epoch ns), and a child only under
    a span whose window holds it. `ssd.round` is the sequence's own round (1, 2, ...),
    `ssd.step` the engine's step counter. draft_of(seq_id): the draft address serving a
    sequence ("" when unknown), for server.address / server.port."""

    def __init__(self, tracer, metrics=None, draft_of=None):
        self.tracer = tracer
        self.metrics = metrics
        self.tracing = tm.tracing_enabled(tracer)
        self.draft_of = draft_of or (lambda seq_id: "")

    def on_step(self, rec) -> None:
        seconds = (rec.end_ns - rec.start_ns) / 1e9
        m = self.metrics
        if m is not None:
            m.observe_step(seconds)
            if rec.jit_ns is not None:
                m.observe_jit((rec.jit_ns[1] - rec.jit_ns[0]) / 1e9)
            m.observe_rates(rec.gate_arm, rec.predicted_tps, rec.realised_tps)
            for row in rec.rows:
                m.observe_length(row.drafted)
                if row.drafted:
                    m.record_round(row.drafted, row.accepted)
                if row.cache_result is not None:
                    m.cache_result(row.cache_result)
                if row.source != Source.NONE:
                    m.speculation_from(str(row.source))
        if not self.tracing:
            return
        jit = set(rec.jit_seq_ids)
        for row in rec.rows:
            parent = row.seq.options.traceparent
            if not parent or not tm.sampled(parent):
                continue
            seq_round = row.seq.spec_stats.num_rounds  # counted at this round's commit: 1, 2, ...
            attrs = {
                tm.ATTR_ROUND: seq_round, tm.ATTR_STEP: rec.round, tm.ATTR_ACCEPTED_TOKENS: row.accepted,
                "ssd.committed_tokens": row.kept,
                tm.ATTR_NUM_SPECULATIVE_TOKENS: row.drafted, tm.ATTR_BATCH_SIZE: len(rec.rows),
                tm.ATTR_CACHE_RESULT: row.cache_result or "miss", "ssd.speculation_source": str(row.source),
                tm.ATTR_VERIFY_MS: seconds * 1e3, tm.ATTR_SEQ_ID: row.seq.seq_id,
                tm.ATTR_REQUEST_ID: row.seq.options.request_id or None,
            }
            if rec.gate_arm is not None:  # adaptive: the gate's choice, the step's plan and what it realised
                attrs["ssd.speculating"] = rec.gate_arm == "spec"
                if rec.realised_tps is not None:
                    attrs["ssd.realised_tokens_per_s"] = round(rec.realised_tps, 3)
                if rec.predicted_tps is not None:
                    attrs["ssd.predicted_tokens_per_s"] = round(rec.predicted_tps, 3)
            tm.round_span(self.tracer, tm.SPAN_VERIFY, parent, rec.start_ns, rec.end_ns, attrs)
            if rec.lookup_ns is not None and row.source != Source.NONE:  # a draft took part in this round
                self._draft_exchange(rec, row, parent, row.seq.seq_id in jit, seq_round)

    def _draft_exchange(self, rec, row, parent, jit: bool, seq_round: int) -> None:
        """The round's exchange with the draft as a CLIENT span: from the JIT request (or the
        verify) to the end of the lookup of the next speculation, with those two inside."""
        jit = jit and rec.jit_ns is not None
        start = rec.jit_ns[0] if jit else rec.start_ns
        ids = {tm.ATTR_ROUND: seq_round, tm.ATTR_STEP: rec.round}
        attrs = {**ids, **tm.rpc_attributes(DRAFT_ROUND_METHOD, self.draft_of(row.seq.seq_id)),
                 tm.RPC_GRPC_STATUS_CODE: 0}
        client = tm.round_span(self.tracer, DRAFT_ROUND_METHOD.strip("/"), parent, start, rec.lookup_ns[1], attrs,
                               kind=SpanKind.CLIENT)
        if jit:  # the miss that preceded this verify
            tm.child_span(self.tracer, tm.SPAN_JIT_DRAFT, client, rec.jit_ns[0], rec.jit_ns[1], ids)
        if not row.seq.finished:  # the next speculation: cache keys, tokens, index
            tm.child_span(self.tracer, tm.SPAN_INDEX_LOOKUP, client, rec.lookup_ns[0], rec.lookup_ns[1], ids)


class DraftObserver:
    """RoundServer.on_round: one `ssd.speculate` span per sequence and round, from the round
    message taken up to the end of the cache build (+ an `ssd.jit_draft` child inside it), the
    fan-out latency histogram. `ssd.round` is the sequence's own round as the draft counts it
    (the target's committed rounds it was told of, plus the one being verified)."""

    def __init__(self, tracer, metrics, server):
        self.tracer = tracer
        self.metrics = metrics
        self.server = server  # RoundServer: its options hold each sequence's traceparent
        self.tracing = tm.tracing_enabled(tracer)

    def on_round(self, rec: dict) -> None:
        build_s = (rec["end_ns"] - rec["build_start_ns"]) / 1e9
        if self.metrics is not None:
            if rec["seqs"]:
                self.metrics.observe_step(build_s)  # role="draft": one speculation-cache build
                self.metrics.observe_fan_out(build_s)
            if rec["jit_ns"] is not None:
                self.metrics.observe_jit((rec["jit_ns"][1] - rec["jit_ns"][0]) / 1e9)
        if not self.tracing:
            return
        jit = set(rec["jit"])
        for seq_id, info in rec["seqs"].items():
            options = self.server.options.get(seq_id, NO_OPTIONS)
            parent = options.traceparent
            if not parent or not tm.sampled(parent):
                continue
            ids = {tm.ATTR_ROUND: info["round"], tm.ATTR_STEP: rec["round"]}
            attrs = {
                **ids, tm.ATTR_FAN_OUT: info["fan_out"], tm.ATTR_BATCH_SIZE: len(rec["seqs"]),
                tm.ATTR_CACHE_RESULT: info["after"], tm.ATTR_SPECULATE_MS: build_s * 1e3,
                "ssd.abandoned": rec["abandoned"], tm.ATTR_REQUEST_ID: options.request_id or None,
                "ssd.draft_seq_id": seq_id,  # the draft's own id for the sequence
            }
            span = tm.round_span(self.tracer, tm.SPAN_SPECULATE, parent, rec["start_ns"], rec["end_ns"], attrs)
            if seq_id in jit and rec["jit_ns"] is not None:
                tm.child_span(self.tracer, tm.SPAN_JIT_DRAFT, span, rec["jit_ns"][0], rec["jit_ns"][1], ids)
