"""`ssd trace`: a PNG timeline of one request's trace, showing the draft's speculation hidden
behind the target's verification, and the rounds where it was not (misses, late caches).

    ssd trace --from spans.json --out timeline.png [--trace-id ID]
    ssd trace --listen 4317 --seconds 60 --out timeline.png [--save spans.json]

--from reads a span list saved by `--save` / OTLPReceiver.save_json, an OTLP/JSON file or a
Jaeger UI "Download JSON" file. --listen runs an in-process OTLP/gRPC receiver (point the
services at it with OTEL_EXPORTER_OTLP_ENDPOINT=http://HOST:PORT) for --seconds or until
Ctrl-C, then draws. Without --trace-id the trace with the most rounds is drawn.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict

# The names telemetry.py exports, repeated so that importing this module (ssd/cli.py does, for
# the `ssd trace` arguments) pulls in neither OpenTelemetry nor grpc; a test keeps them equal.
SERVICE_GATEWAY = "ssd-gateway"
SPAN_VERIFY, SPAN_SPECULATE = "ssd.verify", "ssd.speculate"
SPAN_INDEX_LOOKUP, SPAN_JIT_DRAFT = "ssd.index.lookup", "ssd.jit_draft"
ATTR_ROUND, ATTR_ACCEPTED_TOKENS, ATTR_CACHE_RESULT = "ssd.round", "ssd.accepted_tokens", "ssd.cache_result"

CACHE_COLORS = {"hit": "#2ca02c", "late": "#ff7f0e", "miss": "#d62728"}
NO_RESULT_COLOR = "#7f7f7f"
LANE_COLORS = {"gateway": "#1f77b4", SPAN_INDEX_LOOKUP: "#9467bd", SPAN_JIT_DRAFT: "#8c564b", "other": "#bcbd22"}


# --- selection and summary -------------------------------------------------------------------

def traces(spans: list[dict]) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = defaultdict(list)
    for s in spans:
        by[s["trace_id"]].append(s)
    return dict(by)


def _num_rounds(trace_spans: list[dict]) -> int:
    rounds = {s.get("attributes", {}).get(ATTR_ROUND) for s in trace_spans if s["name"] == SPAN_VERIFY}
    rounds.discard(None)
    return len(rounds) or sum(1 for s in trace_spans if s["name"] == SPAN_VERIFY)


def pick_trace(spans: list[dict], trace_id: str | None = None) -> str:
    """trace_id if given (a prefix is enough), else the trace with the most verify rounds
    (ties: the most spans, then the latest)."""
    by = traces(spans)
    if not by:
        raise ValueError("no spans")
    if trace_id:
        tid = trace_id.lower()
        hits = [t for t in by if t == tid or t.startswith(tid)]
        if len(hits) != 1:
            raise ValueError(f"trace id {trace_id!r} matches {len(hits)} traces")
        return hits[0]
    return max(by, key=lambda t: (_num_rounds(by[t]), len(by[t]), max(s["end_ns"] for s in by[t])))


def _union(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def overlap_ns(xs: list[tuple[int, int]], ys: list[tuple[int, int]]) -> int:
    """Total time covered by both interval sets (each first merged into a union)."""
    u, v = _union(xs), _union(ys)
    i = j = total = 0
    while i < len(u) and j < len(v):
        lo, hi = max(u[i][0], v[j][0]), min(u[i][1], v[j][1])
        if hi > lo:
            total += hi - lo
        if u[i][1] < v[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize(trace_spans: list[dict]) -> dict:
    """Rounds, cache results, verify/speculate time and their overlap for one trace. A round's
    cache result is taken from its verify span, else from its speculate span."""
    verify = [s for s in trace_spans if s["name"] == SPAN_VERIFY]
    spec = [s for s in trace_spans if s["name"] == SPAN_SPECULATE]
    result_by_round: dict = {}
    for group in (spec, verify):  # verify last: it wins
        for i, s in enumerate(group):
            a = s.get("attributes", {})
            if a.get(ATTR_CACHE_RESULT) is not None:
                result_by_round[a.get(ATTR_ROUND, (s["name"], i))] = a[ATTR_CACHE_RESULT]
    counts = Counter(result_by_round.values())
    iv = lambda ss: [(s["start_ns"], s["end_ns"]) for s in ss]  # noqa: E731
    t0 = min(s["start_ns"] for s in trace_spans)
    t1 = max(s["end_ns"] for s in trace_spans)
    return {
        "trace_id": trace_spans[0]["trace_id"],
        "spans": len(trace_spans),
        "rounds": _num_rounds(trace_spans),
        "hits": counts.get("hit", 0),
        "misses": counts.get("miss", 0),
        "late": counts.get("late", 0),
        "accepted_tokens": sum(int(s.get("attributes", {}).get(ATTR_ACCEPTED_TOKENS, 0) or 0) for s in verify),
        "duration_ms": (t1 - t0) / 1e6,
        "verify_ms": sum(b - a for a, b in iv(verify)) / 1e6,
        "speculate_ms": sum(b - a for a, b in iv(spec)) / 1e6,
        "overlap_ms": overlap_ns(iv(spec), iv(verify)) / 1e6,
    }


# --- drawing ---------------------------------------------------------------------------------

def _lane_of(s: dict) -> str:
    if s["name"] in (SPAN_VERIFY, SPAN_SPECULATE, SPAN_INDEX_LOOKUP, SPAN_JIT_DRAFT):
        return s["name"]
    if s.get("service") == SERVICE_GATEWAY or not s.get("parent_span_id"):
        return "gateway"
    return f"{s.get('service') or '?'}: {s['name']}"


def _lane_label(lane: str) -> str:
    return {
        "gateway": "gateway / root",
        SPAN_VERIFY: "target  ssd.verify",
        SPAN_SPECULATE: "draft  ssd.speculate",
        SPAN_INDEX_LOOKUP: "ssd.index.lookup",
        SPAN_JIT_DRAFT: "ssd.jit_draft",
    }.get(lane, lane)


def draw_timeline(spans: list[dict], out_png: str, trace_id: str | None = None) -> dict:
    """Draw one trace (default: the one with the most rounds) as a PNG and return its
    `summarize` dict (plus "out")."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    tid = pick_trace(spans, trace_id)
    tr = sorted(traces(spans)[tid], key=lambda s: s["start_ns"])
    summary = summarize(tr)
    t0 = min(s["start_ns"] for s in tr)

    fixed = ["gateway", SPAN_VERIFY, SPAN_SPECULATE, SPAN_INDEX_LOOKUP, SPAN_JIT_DRAFT]
    present = {_lane_of(s) for s in tr}
    lanes = [x for x in fixed[:1] if x in present] + sorted(present - set(fixed)) + [x for x in fixed[1:] if x in present]
    row = {lane: i for i, lane in enumerate(lanes)}

    span_ms = max(summary["duration_ms"], 1e-3)
    fig = Figure(figsize=(min(40.0, max(10.0, 0.12 * summary["rounds"] + 8)), 1.6 + 0.7 * len(lanes)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for s in tr:
        lane = _lane_of(s)
        a = s.get("attributes", {})
        x, w = (s["start_ns"] - t0) / 1e6, max((s["end_ns"] - s["start_ns"]) / 1e6, span_ms * 1e-4)
        if lane in (SPAN_VERIFY, SPAN_SPECULATE):
            color = CACHE_COLORS.get(a.get(ATTR_CACHE_RESULT), NO_RESULT_COLOR)
        else:
            color = LANE_COLORS.get(lane, LANE_COLORS["other"])
        y = row[lane]
        height = 0.6 if lane != "gateway" else 0.35
        ax.broken_barh([(x, w)], (y - height / 2, height), facecolors=color, edgecolors="black", linewidth=0.3,
                       alpha=0.9)
        rnd = a.get(ATTR_ROUND)
        if rnd is not None and lane in (SPAN_VERIFY, SPAN_SPECULATE):
            label = str(rnd)
            if lane == SPAN_VERIFY and a.get(ATTR_ACCEPTED_TOKENS) is not None:
                label += f"\n+{a[ATTR_ACCEPTED_TOKENS]}"
            ax.text(x + w / 2, y, label, ha="center", va="center", fontsize=6, clip_on=True)
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels([_lane_label(x) for x in lanes], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, span_ms * 1.01)
    ax.set_xlabel("ms since request start")
    ax.grid(axis="x", linestyle=":", linewidth=0.5)
    ax.set_title(f"trace {tid[:16]}…  rounds {summary['rounds']}  hit {summary['hits']} / late {summary['late']} / "
                 f"miss {summary['misses']}  verify {summary['verify_ms']:.1f} ms, speculate "
                 f"{summary['speculate_ms']:.1f} ms, overlapped {summary['overlap_ms']:.1f} ms", fontsize=9)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in CACHE_COLORS.items()]
              + [Patch(color=NO_RESULT_COLOR, label="no cache result")],
              loc="upper center", bbox_to_anchor=(0.5, -0.09 - 0.3 / max(1, len(lanes))), fontsize=7, ncol=4,
              frameon=False)
    fig.tight_layout()
    fig.savefig(out_png)
    return dict(summary, out=str(out_png))


# --- CLI -------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="from_file", metavar="FILE", help="spans: saved list, OTLP/JSON or Jaeger JSON")
    src.add_argument("--listen", type=int, metavar="PORT", help="receive OTLP/gRPC spans on PORT (4317 like Jaeger)")
    p.add_argument("--host", default="127.0.0.1", help="--listen address (0.0.0.0: reachable from other hosts)")
    p.add_argument("--seconds", type=float, default=60.0, help="--listen: stop receiving after this long (or Ctrl-C)")
    p.add_argument("--save", metavar="FILE", help="--listen: also save the received spans as JSON")
    p.add_argument("--out", default="timeline.png", help="PNG to write")
    p.add_argument("--trace-id", help="trace to draw (a unique prefix is enough); default: the most rounds")
    p.add_argument("--list", action="store_true", help="list the traces (id, rounds, spans) and draw nothing")
    return p


def _receive(ns) -> list[dict]:
    from .otlp_receiver import OTLPReceiver

    rx = OTLPReceiver(port=ns.listen, host=ns.host).start()
    print(f"receiving OTLP/gRPC on {ns.host}:{rx.port} for {ns.seconds:g} s (Ctrl-C to stop early); "
          f"export with OTEL_EXPORTER_OTLP_ENDPOINT=http://{'localhost' if ns.host in ('0.0.0.0', '127.0.0.1') else ns.host}:{rx.port}",
          file=sys.stderr, flush=True)
    try:
        deadline = time.monotonic() + ns.seconds
        while time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    except KeyboardInterrupt:
        pass
    finally:
        rx.stop(grace=1.0)
    spans = rx.spans()
    if ns.save:
        rx.save_json(ns.save)
        print(f"saved {len(spans)} spans to {ns.save}", file=sys.stderr)
    return spans


def run(ns: argparse.Namespace) -> int:
    from .otlp_receiver import load_spans

    spans = load_spans(ns.from_file) if ns.from_file else _receive(ns)
    if not spans:
        print("no spans received", file=sys.stderr)
        return 1
    if ns.list:
        by = traces(spans)
        for tid in sorted(by, key=lambda t: min(s["start_ns"] for s in by[t])):
            print(f"{tid}  rounds {_num_rounds(by[tid]):4d}  spans {len(by[tid]):5d}")
        return 0
    try:
        summary = draw_timeline(spans, ns.out, ns.trace_id)
    except ValueError as e:
        print(f"ssd trace: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ssd trace", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return run(add_arguments(p).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
