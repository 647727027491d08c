"""`ssd bench --serve`: AR, SD and SSD under load, through the services.

The real stack (draft, target and gateway as local processes on loopback: what `ssd serve`
starts) is driven through the gateway's streaming gRPC Generate by `c` concurrent clients, each
sending its next prompt as soon as its previous answer ends (closed loop), for every
concurrency level, every sampling setting (greedy, sampled) and every mode. The mode is the
request's own `mode` field: one SSD target serves all three, so AR, SD and SSD share the same
processes, weights, threads and machine. One stack serves the whole run, as a server that has
been up for a while: the engine's measured costs and the speculation gate's per-load
measurements carry from cell to cell. Greedy SD and SSD requests leave their speculations in the
target's speculation index (kept for retries), and greedy SSD requests read it: the bench's stack
keeps them INDEX_TTL_S seconds (`--index-ttl-s`), and a greedy SSD cell that could meet what an
earlier cell published waits until those entries have expired, so SSD never replays another
cell's drafts (the report's `speculation_sources` shows index use).

Per cell (sampling, concurrency, mode), from what the client saw: aggregate tokens/s, requests/s,
per-request tokens/s, time to first token and inter-token latency (p50/p99; a response of n
tokens spreads its interval over them, as the gateway's own histogram does); from the requests'
final statistics: acceptance, speculation-cache hit rate; from the target's Prometheus counters
(difference over the cell): cache lookups and where the verified speculations came from (cache,
index, just-in-time draft, n-gram backup). Consistency checks the report carries: every
request's usage equals the tokens it streamed; the per-request cache counts add up to the
target's counters; the client's inter-token gaps are as many as the gateway's; greedy outputs
are identical in every mode and at every concurrency (speculation is lossless and the kernels
batch-invariant), and so are seeded sampled outputs (each request has its own seed; coupled
verification makes the output a function of the seed and the prompt alone).
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time

from . import BenchOptions, save_results
from .engines import load_prompts

SAMPLINGS = ("greedy", "sampled", "seeded")
IN_PROCESS = "ssd-engine"  # the row of the same SSD engine driven in process (one client), no services


def parse_levels(text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4]; every level a positive integer, no repeats."""
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or any(c < 1 for c in levels) or len(set(levels)) != len(levels):
        raise ValueError(f"--concurrency must list distinct positive integers, got {text!r}")
    return levels


def parse_samplings(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    if not out or any(x not in SAMPLINGS for x in out) or len(set(out)) != len(out):
        raise ValueError(f"--sampling must list distinct values of {SAMPLINGS}, got {text!r}")
    return out


def sampling_params(kind: str, params):
    """greedy: temperature 0; sampled and seeded: the bench's --temperature (1.0 when it is 0),
    --top-k and --top-p. A seeded request gets its own seed (its prompt's index + --seed, in
    run_cell); a sampled one none, as most chat clients send (the target draws its own)."""
    if kind == "greedy":
        return dataclasses.replace(params, temperature=0.0, top_k=0, top_p=1.0)
    return dataclasses.replace(params, temperature=params.temperature or 1.0, seed=None)


def request_params(kind: str, params, seed: int, i: int):
    """The parameters of the kind's i-th request: seeded requests carry seed + i."""
    return dataclasses.replace(params, seed=seed + i) if kind == "seeded" else params


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated q-th percentile (q in [0, 100]); None for no values."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _one_request(stub, pb, sampling_to_pb, messages, mode, params) -> dict:
    """Stream one Generate; record when each response arrived and how many tokens it held."""
    import grpc

    req = pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in messages]),
                             sampling=sampling_to_pb(params), mode=mode)
    t_send = time.perf_counter()
    chunks, tokens, last = [], [], None
    try:
        for r in stub.Generate(req, timeout=3600):
            chunks.append((time.perf_counter(), len(r.token_ids)))
            tokens.extend(r.token_ids)
            last = r
    except grpc.RpcError as e:
        return {"error": f"{e.code().name}: {e.details()}"}
    st = last.stats
    return {
        "t_send": t_send, "t_end": time.perf_counter(), "chunks": chunks, "tokens": tokens,
        "finish_reason": last.finish_reason, "completion_tokens": last.usage.completion_tokens,
        "stats": {k: getattr(st, k) for k in ("num_rounds", "num_drafts", "num_draft_tokens", "num_accepted_tokens",
                                              "cache_hit", "cache_late", "cache_miss")},
    }


class Metrics:
    """Counter differences of the target's and the gateway's /metrics over one cell."""

    TARGET = {"cache_" + r: ("ssd_speculation_cache_total", {"result": r}) for r in ("hit", "late", "miss")}
    TARGET.update({"source_" + s: ("ssd_speculation_source_total", {"source": s})
                   for s in ("cache", "index", "jit", "backup")})
    TARGET["num_drafts"] = ("ssd_spec_decode_num_drafts_total", {})
    GATEWAY = {"itl_count": ("ssd_inter_token_latency_seconds_count", {}),
               "ttft_count": ("ssd_time_to_first_token_seconds_count", {}),
               "generation_tokens": ("ssd_generation_tokens_total", {})}

    def __init__(self, target_url: str, gateway_url: str):
        self.urls = {"target": (target_url, self.TARGET), "gateway": (gateway_url, self.GATEWAY)}

    def read(self) -> dict[str, float]:
        from ssd.services.metrics import sample, scrape

        out = {}
        for url, names in self.urls.values():
            got = scrape(url)
            out.update({k: sample(got, name, **labels) for k, (name, labels) in names.items()})
        return out


def run_cell(stub, metrics: Metrics, prompts: list[list[dict]], mode: str, concurrency: int, params,
             seed: int, kind: str = "seeded") -> dict:
    """All prompts through the gateway, `concurrency` clients at a time; the cell's report."""
    from ssd.services.convert import sampling_to_pb
    from ssd.services.gateway.server import inter_token_gaps
    from ssd.services.protos import pb

    before = metrics.read()
    load = os.getloadavg()[0]  # the machine's 1-minute load average (others' work shares the cores)
    results: list[dict | None] = [None] * len(prompts)
    lock = threading.Lock()
    todo = iter(range(len(prompts)))

    def client():
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            results[i] = _one_request(stub, pb, sampling_to_pb, prompts[i], mode, request_params(kind, params, seed, i))

    t0 = time.perf_counter()
    clients = [threading.Thread(target=client) for _ in range(min(concurrency, len(prompts)))]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    wall = time.perf_counter() - t0
    after = metrics.read()
    server = {k: after[k] - before[k] for k in after}

    ok = [r for r in results if "error" not in r]
    ttft, gaps, per_req = [], [], []
    for r in ok:
        prev, first = r["t_send"], True
        for t, n in r["chunks"]:
            if n and first:
                ttft.append(t - r["t_send"])
            if n:
                gaps += inter_token_gaps(n, t - prev, first)
                prev, first = t, False
        per_req.append(len(r["tokens"]) / (r["t_end"] - r["t_send"]))
    tokens = sum(len(r["tokens"]) for r in ok)
    st = {k: sum(r["stats"][k] for r in ok) for k in ok[0]["stats"]} if ok else {}
    lookups = st.get("cache_hit", 0) + st.get("cache_late", 0) + st.get("cache_miss", 0)
    sources = {s: server["source_" + s] for s in ("cache", "index", "jit", "backup")}
    verified = sum(sources.values())
    return {
        "mode": mode, "concurrency": concurrency, "requests": len(prompts), "errors": [r["error"] for r in results if "error" in r],
        "tokens": tokens, "wall_s": wall, "load_avg_1m_at_start": load,
        "aggregate_tokens_per_s": tokens / wall, "requests_per_s": len(ok) / wall,
        "per_request_tokens_per_s": {"mean": sum(per_req) / len(per_req) if per_req else None,
                                     "p50": percentile(per_req, 50)},
        "ttft_s": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
        "itl_s": {"p50": percentile(gaps, 50), "p99": percentile(gaps, 99), "count": len(gaps)},
        "acceptance_rate": st["num_accepted_tokens"] / st["num_draft_tokens"] if st.get("num_draft_tokens") else None,
        "mean_accepted_length": ((tokens - len(ok)) / st["num_rounds"]) if st.get("num_rounds") else None,
        "cache_hit_rate": (st["cache_hit"] + st["cache_late"]) / lookups if lookups else None,
        "request_stats": st,
        "speculation_sources": sources,
        "backup_share": sources["backup"] / verified if verified else None,
        "server_counters": server,
        "tokens_match_usage": all(r["completion_tokens"] == len(r["tokens"]) for r in ok),
        "finish_reasons": sorted({r["finish_reason"] for r in ok}),
        "tokens_per_request": [len(r["tokens"]) if "error" not in r else None for r in results],
        "outputs": [r["tokens"] if "error" not in r else None for r in results],
    }


WARMUP = [{"role": "user", "content": "Warm-up: say hello."}]  # not a bench prompt (see _Stack.start)
INDEX_TTL_S = 8.0  # the bench stack's speculation index TTL: what a greedy SSD cell waits out (see run_serving)


class _Stack:
    """The services as `ssd serve` starts them (draft, target, gateway on loopback, /metrics on),
    started again on demand; each start warms every mode up with a prompt of its own."""

    def __init__(self, cfg, modes: list[str], params):
        from ssd.config import config_args

        self.args, self.modes, self.params = config_args(cfg), modes, params
        self.procs, self.starts, self.stub, self.metrics, self.draft = [], 0, None, None, ""

    def start(self) -> None:
        import grpc

        from ssd.services.common import CHANNEL_OPTIONS
        from ssd.services.protos import pb, pb_grpc
        from ssd.services.run import start_stack

        self.stop()
        t0 = time.perf_counter()
        ports = start_stack(self.args, self.procs, metrics_port=0)
        self.starts += 1
        self.stub = pb_grpc.GatewayStub(grpc.insecure_channel(f"127.0.0.1:{ports['gateway']['port']}",
                                                              options=CHANNEL_OPTIONS))
        self.metrics = Metrics(f"http://127.0.0.1:{ports['target']['metrics_port']}/metrics",
                               f"http://127.0.0.1:{ports['gateway']['metrics_port']}/metrics")
        self.draft = self.stub.ListModels(pb.ListModelsRequest(), timeout=60).models[0].draft
        for mode in self.modes:  # the first request of each mode pays one-off costs
            run_cell(self.stub, self.metrics, [WARMUP], mode, 1, dataclasses.replace(self.params, max_tokens=4), 0)
        print(f"stack {'up' if self.starts == 1 else 'restarted'} in {time.perf_counter() - t0:.0f} s "
              f"(gateway 127.0.0.1:{ports['gateway']['port']})", flush=True)

    def stop(self) -> None:
        from ssd.services.run import stop_stack

        stop_stack(self.procs)
        self.procs = []


def run_engine_cell(cfg, pair, prompts: list[list[dict]], params, seed: int, kind: str) -> dict:
    """The SSD engine the target service runs, driven in this process one request at a time (the
    services' one-client case with no gateway, no gRPC and no streaming): a fresh engine and draft
    process, warmed up like the stack, so its row at one client is what the services cost on top
    of the engine. Measured as the services' cells are, from the first request sent to the last
    token; TTFT and inter-token latency are not observed (generate() returns whole answers)."""
    from ssd.engine import build_engine

    cfg = cfg.replace(mode="ssd")
    with build_engine(cfg, pair) as eng:
        eng.generate([pair.tokenizer.apply_chat_template(WARMUP)], dataclasses.replace(params, max_tokens=4, seed=0))
        eng.stats = type(eng.stats)()
        outputs, per_req = [], []
        t0 = time.perf_counter()
        for i, messages in enumerate(prompts):
            t = time.perf_counter()
            seq = eng.generate([pair.tokenizer.apply_chat_template(messages)], request_params(kind, params, seed, i))[0]
            outputs.append(list(seq.output_ids))
            per_req.append(len(seq.output_ids) / (time.perf_counter() - t))
        wall = time.perf_counter() - t0
        st = eng.stats
    tokens = sum(map(len, outputs))
    lookups = st.cache_hit + st.cache_late + st.cache_miss
    return {
        "mode": IN_PROCESS, "concurrency": 1, "requests": len(prompts), "errors": [], "tokens": tokens, "wall_s": wall,
        "load_avg_1m_at_start": None, "aggregate_tokens_per_s": tokens / wall, "requests_per_s": len(prompts) / wall,
        "per_request_tokens_per_s": {"mean": sum(per_req) / len(per_req), "p50": percentile(per_req, 50)},
        "ttft_s": {"p50": None, "p99": None}, "itl_s": {"p50": None, "p99": None, "count": None},
        "acceptance_rate": st.num_accepted_tokens / st.num_draft_tokens if st.num_draft_tokens else None,
        "mean_accepted_length": None,
        "cache_hit_rate": (st.cache_hit + st.cache_late) / lookups if lookups else None,
        "request_stats": {}, "speculation_sources": {}, "backup_share": None, "server_counters": {},
        "tokens_match_usage": True, "finish_reasons": [], "tokens_per_request": list(map(len, outputs)),
        "outputs": outputs,
    }


def run_serving(cfg, params, opts: BenchOptions) -> int:
    from ssd.engine import ModelPair
    from ssd.models.loader import default_target_path, resolve_model

    levels = parse_levels(opts.concurrency)
    kinds = parse_samplings(opts.sampling)
    modes = [m.strip() for m in opts.modes.split(",") if m.strip()]
    repeats = opts.repeats
    rows = load_prompts(opts.prompts, opts.num_prompts)
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    settings = {k: sampling_params(k, params) for k in kinds}
    if cfg.target in ("default", "smollm2-135m-instruct"):
        default_target_path()  # convert once here, not in three processes at once
    in_process = 1 in levels and "ssd" in modes  # the same engine without the services, at one client
    cells_total = len(kinds) * repeats * (len(levels) * len(modes) + in_process)
    print(f"serving bench: {len(prompts)} prompts x {params.max_tokens} tokens, modes {','.join(modes)}"
          f"{' (+ ' + IN_PROCESS + ' at c=1)' if in_process else ''}, concurrency {','.join(map(str, levels))}, "
          f"{', '.join(kinds)}, {repeats} repeat(s) ({cells_total} cells); target {cfg.target_threads} thread(s), "
          f"draft {cfg.draft_threads}, max batch {cfg.max_batch}, b* {cfg.speculation.critical_batch_size}", flush=True)
    for k, p in settings.items():
        print(f"  {k}: temperature {p.temperature}, top_k {p.top_k}, top_p {p.top_p}, ignore_eos {p.ignore_eos}"
              f"{', seed ' + str(opts.seed or 0) + ' + request index' if k == 'seeded' else ''}", flush=True)
    pair = ModelPair.load(cfg) if in_process else None
    stack, cells = _Stack(cfg.replace(index_ttl_s=INDEX_TTL_S), modes, params), []
    t_start = time.perf_counter()
    try:
        stack.start()
        published = None  # when greedy SD/SSD requests last left entries in the target's speculation index
        for kind in kinds:
            for c in levels:
                for rep in range(repeats):  # repeats interleaved: drift in machine load hits every mode
                    for mode in modes + ([IN_PROCESS] if in_process and c == 1 else []):
                        if mode == IN_PROCESS:
                            cell = run_engine_cell(cfg, pair, prompts, settings[kind], opts.seed or 0, kind)
                        else:
                            if kind == "greedy" and mode == "ssd" and published is not None:
                                # greedy SD and SSD requests publish their speculations in the target's
                                # index, and a greedy SSD request reads it: the same prompts again would
                                # hit what an earlier cell drafted. Wait until those entries expired.
                                time.sleep(max(0.0, published + INDEX_TTL_S + 1.0 - time.perf_counter()))
                            cell = run_cell(stack.stub, stack.metrics, prompts, mode, c, settings[kind], opts.seed or 0,
                                            kind)
                            if kind == "greedy" and mode != "ar":
                                published = time.perf_counter()
                        cell["sampling"], cell["repeat"] = kind, rep
                        cells.append(cell)
                        _progress(cell, len(cells), cells_total, time.perf_counter() - t_start)
    finally:
        stack.stop()
    result = {
        "command": opts.command_line,
        "target": str(resolve_model(cfg.target)),
        "draft": stack.draft,
        "stack_starts": stack.starts,
        "index_ttl_s": INDEX_TTL_S,
        "engine": {k: v for k, v in vars(cfg).items() if k != "speculation"},
        "speculation": vars(cfg.speculation),
        "prompts": opts.prompts or "built-in", "num_prompts": len(prompts), "max_tokens": params.max_tokens,
        "concurrency": levels, "modes": modes + ([IN_PROCESS] if in_process else []), "repeats": repeats,
        "sampling": {k: vars(p) for k, p in settings.items()},
        "cells": cells,
    }
    check_identity(result)
    for c in cells:  # the outputs served the check; the report keeps its verdict, not the tokens
        del c["outputs"]
    result["ratios"] = mode_ratios(cells)
    _print_summary(result)
    js, png = save_results(opts.out, "serve", result, plot)
    print(f"wrote {js} and {png}")
    bad = [c for c in cells if c["errors"] or not c["tokens_match_usage"] or c.get("identical_to_reference") is False]
    return 1 if bad else 0


def check_identity(result: dict) -> None:
    """Each reproducible sampling setting's cells: outputs equal to its first cell's, in every mode
    (the in-process engine too), at every concurrency and in every repeat. Greedy: speculation is
    lossless and the kernels batch-invariant. Seeded: a seeded request's output is a function of
    its seed and prompt alone (coupled verification, docs/algorithm.md section 5b). Unseeded
    sampled requests draw their own seeds: no reference (identical_to_reference None)."""
    result["identity_reference"] = {}
    for kind in dict.fromkeys(c["sampling"] for c in result["cells"]):
        cells = [c for c in result["cells"] if c["sampling"] == kind]
        if kind == "sampled":
            for c in cells:
                c["identical_to_reference"] = None
            continue
        ref = cells[0]
        result["identity_reference"][kind] = f"{ref['mode']} at concurrency {ref['concurrency']}"
        for c in cells:
            c["identical_to_reference"] = c["outputs"] == ref["outputs"] and None not in c["outputs"]


RATIOS = (("ssd", "sd"), ("ssd", "ar"), ("sd", "ar"), ("ssd", IN_PROCESS))


def mode_ratios(cells: list[dict]) -> list[dict]:
    """Per (sampling, concurrency): each mode's aggregate tokens/s over another's, taken within
    each repeat (modes ran side by side); the median over repeats, and their range."""
    out, groups = [], {}
    for c in cells:
        groups.setdefault((c["sampling"], c["concurrency"]), {}).setdefault(c.get("repeat", 0), {})[c["mode"]] = \
            c["aggregate_tokens_per_s"]
    for (kind, level), reps in groups.items():
        row = {"sampling": kind, "concurrency": level}
        for a, b in RATIOS:
            rs = sorted(t[a] / t[b] for t in reps.values() if a in t and b in t)
            if rs:
                row[f"{a}/{b}"] = percentile(rs, 50)
                row[f"{a}/{b} range"] = [rs[0], rs[-1]]
        out.append(row)
    return out


def _ms(x) -> str:
    return "-" if x is None else f"{1000 * x:.0f}"


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _progress(c: dict, i: int, n: int, elapsed: float) -> None:
    print(f"[{i}/{n} {elapsed:5.0f}s] {c['sampling']:<7} {c['mode']:>10} c={c['concurrency']:<3} "
          f"{c['aggregate_tokens_per_s']:7.2f} tok/s, {c['per_request_tokens_per_s']['p50'] or 0:6.2f} tok/s/req, "
          f"TTFT p50 {_ms(c['ttft_s']['p50'])} ms, ITL p50 {_ms(c['itl_s']['p50'])} ms, "
          f"hit {_pct(c['cache_hit_rate'])}, backup {_pct(c['backup_share'])}"
          + (f", {len(c['errors'])} ERRORS" if c["errors"] else ""), flush=True)


def _print_summary(r: dict) -> None:
    print("\n(TTFT and ITL in ms; hit: speculation-cache hit rate; backup: share of speculations from the n-gram backup)")
    print(f"{'sampling':<8} {'c':>3} {'mode':>10} {'tok/s':>8} {'req/s':>6} {'tok/s/req':>9} {'TTFT p50':>9} {'p99':>6} "
          f"{'ITL p50':>8} {'p99':>6} {'accept':>7} {'hit':>5} {'backup':>6} {'same':>5}")
    for c in r["cells"]:
        print(f"{c['sampling']:<8} {c['concurrency']:>3} {c['mode']:>10} {c['aggregate_tokens_per_s']:>8.2f} "
              f"{c['requests_per_s']:>6.2f} {c['per_request_tokens_per_s']['p50'] or 0:>9.2f} "
              f"{_ms(c['ttft_s']['p50']):>9} {_ms(c['ttft_s']['p99']):>6} {_ms(c['itl_s']['p50']):>8} {_ms(c['itl_s']['p99']):>6} "
              f"{_pct(c['acceptance_rate']):>7} {_pct(c['cache_hit_rate']):>5} {_pct(c['backup_share']):>6} "
              f"{str(c.get('identical_to_reference', '-')):>5}")
    print("aggregate tokens/s, one mode over another (median over repeats [range]):")
    for row in r["ratios"]:
        print(f"  {row['sampling']:<8} c={row['concurrency']:<3} "
              + "  ".join(f"{k} {v:.2f} [{row[k + ' range'][0]:.2f}, {row[k + ' range'][1]:.2f}]"
                          for k, v in row.items() if "/" in k and not k.endswith("range")))


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(r["sampling"])
    colors = {"ar": "#777", "sd": "#4a7", "ssd": "#d62", IN_PROCESS: "#26b"}
    fig, axes = plt.subplots(len(kinds), 3, figsize=(15, 4.2 * len(kinds)), squeeze=False)

    def median(cs, get):
        vals = [get(c) for c in cs if get(c) is not None]
        return percentile(vals, 50) if vals else 0.0

    for row, kind in zip(axes, kinds):
        for mode in r["modes"]:
            by_level = {}
            for c in r["cells"]:  # each level's median over repeats
                if c["sampling"] == kind and c["mode"] == mode:
                    by_level.setdefault(c["concurrency"], []).append(c)
            cs = [{"concurrency": lv, "agg": median(g, lambda c: c["aggregate_tokens_per_s"]),
                   "itl": median(g, lambda c: c["itl_s"]["p50"]),
                   "per_req": median(g, lambda c: c["per_request_tokens_per_s"]["p50"])} for lv, g in by_level.items()]
            agg = [c["agg"] for c in cs]
            xs = ([1000 * c["itl"] for c in cs], [c["per_req"] for c in cs], [c["concurrency"] for c in cs])
            for ax, x in zip(row, xs):
                ax.plot(x, agg, marker="o", color=colors.get(mode), label=mode)
                for xi, yi, c in zip(x, agg, cs):
                    ax.annotate(str(c["concurrency"]), (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
        row[0].set_xlabel(f"inter-token latency p50 (ms; {IN_PROCESS}: not observed, at 0)")
        row[1].set_xlabel("per-request tokens/s (p50)")
        row[2].set_xlabel("concurrent clients")
        row[2].set_xscale("log", base=2)
        for ax in row:
            ax.set_ylabel("aggregate tokens/s")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        row[0].set_title(f"{kind}: throughput vs latency (labels: concurrency)", fontsize=9)
        row[1].set_title(f"{kind}: throughput vs per-request speed", fontsize=9)
        row[2].set_title(f"{kind}: throughput vs concurrency", fontsize=9)
    fig.suptitle(f"ssd bench --serve: {r['num_prompts']} prompts x {r['max_tokens']} tokens, median of "
                 f"{r.get('repeats', 1)} repeat(s); draft {r['draft'][:70]}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
