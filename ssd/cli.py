"""`ssd` command line. Flags are derived from the config dataclasses' fields, so the CLI and
library defaults are one and the same."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from .config import EngineConfig, SamplingParams, SpeculationConfig, config_args

_HELP = {
    "target": "target model directory, or 'default' (SmolLM2-135M-Instruct, converted once from its GGUF)",
    "draft": "'default' (the trained draft shipped for the default target), 'feature' (the shipped feature drafter: reads the target's hidden states), a draft directory, or 'standin' (the target's first layers; weak)",
    "mode": "ar | sd | ssd",
    "num_speculative_tokens": "K, draft tokens per round",
    "fan_out_budget": "SSD: branches per sequence per round (sum of F_k)",
    "fan_out": "SSD fan-out schedule: geometric (Saguaro) | uniform",
    "saguaro_c": "Saguaro sampling C in [0, 1] (1 = off); sampled decoding only",
    "critical_batch_size": "b*: misses use the JIT draft below it, the n-gram backup at or above it",
    "temperature": "0 = greedy",
    "gate": "adaptive: per load and temperature mix, measure tokens/s with and without speculation and speculate "
            "only where it pays (--no-gate: always speculate, lengths still planned)",
    "dtype": "auto | bfloat16 | float32 for target and draft; auto = bf16 where the hardware has it natively",
    "draft_weights": "the draft's weights: auto | int8 (quantized on load) | dense (--dtype); auto = int8 where the CPU kernels run",
    "weights": "the target's weights: auto | gguf (the GGUF file's own 4/8-bit blocks, run natively) | int8 "
               "(quantized on load) | dense (--dtype); auto = gguf where the model has a GGUF file and the CPU kernels run",
    "activations": "what quantized weights multiply (target and draft): auto | int8 (each activation row quantized "
                   "to 8 bits per block of 32, integer dot products: AVX-512 VNNI) | bf16 (as they are: AVX-512 BF16); "
                   "auto = int8 where the CPU has VNNI",
    "batch_invariant": "kernels whose results do not depend on the batch shape, so speculative greedy output is "
                       "bit-identical to AR (--no-batch-invariant: the fast non-invariant kernels)",
    "index_ttl_s": "SSD: seconds a published speculation stays in the speculation index (in-process or Redis), "
                   "for retried and repeated requests",
    "max_tokens": "new tokens to generate",
    "logit_bias": "ID:VALUE,...: added to those tokens' target logits (-100 bans a token)",
    "logprobs": "report each token's target log-probability and this many alternatives (--json)",
    "min_tokens": "no end-of-sequence token before this many new tokens",
    "answers": "make-data: target (the target writes every answer) | dataset (ShareGPT's own replies, scored by "
               "the target in one forward per batch: no decoding, far faster; with --generated-share 0 "
               "--sampled-share 0; --gen-batch, --temperature and --top-p do not apply)",
}


def _add_fields(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name == "speculation":
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
        if "bool" in kind:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=_HELP.get(f.name))
        elif kind.startswith("tuple"):  # logit_bias: "ID:BIAS,ID:BIAS"
            parser.add_argument(flag, type=_pairs, default=default, help=_HELP.get(f.name, "ID:VALUE,ID:VALUE"))
        else:
            conv = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(flag, type=conv, default=default, help=_HELP.get(f.name, f"(default {default})"))


def _pairs(text: str) -> tuple:
    """"5:-100,17:2.5" -> ((5, -100.0), (17, 2.5))."""
    try:
        return tuple((int(t), float(v)) for t, v in (item.split(":") for item in text.split(",") if item.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID:VALUE[,ID:VALUE...], got {text!r}") from None


def _build(cls, ns, **override):
    kw = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name) and f.name != "speculation"}
    kw.update(override)
    return cls(**kw)


def _configs(ns):
    """Configs from the flags; invalid values end the command with exit status 2 and a message."""
    try:
        speculation = _build(SpeculationConfig, ns)
        return _build(EngineConfig, ns, speculation=speculation), _build(SamplingParams, ns)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _prompt_ids(tok, text: str, raw: bool) -> list[int]:
    if raw:
        return tok.encode(text)
    return tok.apply_chat_template([{"role": "user", "content": text}])


# ---- ssd generate ------------------------------------------------------------------------------
def cmd_generate(ns) -> int:
    from .engine import ModelPair, build_engine

    cfg, params = _configs(ns)
    if not ns.prompt.strip():
        print("error: prompt is empty", file=sys.stderr)
        return 2
    pair = ModelPair.load(cfg)
    tok = pair.tokenizer
    engine = build_engine(cfg, pair)
    try:
        try:
            seq = engine.add_request(_prompt_ids(tok, ns.prompt, ns.raw), params)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        decoder = tok.stream_decoder()
        t0 = time.perf_counter()
        while engine.has_unfinished():
            for s, new in engine.step():
                if not ns.json:
                    for t in new:
                        sys.stdout.write(decoder.push(t))
                    sys.stdout.flush()
        wall = time.perf_counter() - t0
        engine.stats.wall += wall
    finally:
        engine.close()
    summary = engine.stats.summary()
    draft_desc = pair.draft_desc.describe() if cfg.mode != "ar" else None
    result = {
        "text": tok.decode(seq.output_ids),
        "token_ids": seq.output_ids,
        "finish_reason": seq.finish_reason,
        "mode": cfg.mode,
        "target": pair.target_path,
        "draft": draft_desc,
        "stats": summary,
    }
    if params.logprobs is not None:  # each token's log-probability under the target, with alternatives
        result["logprobs"] = [{"token_id": t, "logprob": lp, "top": [{"token_id": a, "logprob": v} for a, v in alts]}
                              for t, (lp, alts) in zip(seq.output_ids, seq.logprobs)]
    if ns.json:
        print(json.dumps(result))
    else:
        s = summary
        print()
        print("---")
        parts = [f"mode={cfg.mode}", f"tokens={s['tokens']}", f"{s['tokens_per_s']:.2f} tok/s",
                 f"mean accepted length={s['mean_accepted_length']:.2f}"]
        if s["cache_hit_rate"] is not None:
            parts.append(f"cache hit rate={s['cache_hit_rate']:.2f}")
        if s["acceptance_rate"] is not None:
            parts.append(f"acceptance={s['acceptance_rate']:.2f}")
        print("  ".join(parts))
        if draft_desc:
            print(f"draft: {draft_desc}")
    return 0


# ---- ssd bench ---------------------------------------------------------------------------------
def cmd_bench(ns) -> int:
    from .benchmarks import BenchOptions
    from .benchmarks.engines import run_bench

    cfg, params = _configs(ns)
    opts = BenchOptions.from_args(ns)
    if ns.repeats < 1:
        print(f"error: --repeats must be at least 1 (got {ns.repeats})", file=sys.stderr)
        return 2
    if ns.serve:
        from .benchmarks.serving import parse_levels, parse_samplings, run_serving

        clash = [flag for flag, on in (("--numerics", ns.numerics), ("--no-hf", ns.no_hf), ("--no-llama-cpp", ns.no_llama_cpp),
                                              ("--json", ns.json)) if on]
        try:
            if clash:
                raise ValueError(f"{', '.join(clash)} do(es) not apply to --serve")
            parse_levels(ns.concurrency)
            parse_samplings(ns.sampling)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return run_serving(cfg, params, opts)
    if ns.numerics:
        from .benchmarks.numerics import run_numerics

        if ns.repeats != 1:
            print("error: --repeats does not apply to --numerics", file=sys.stderr)
            return 2
        return run_numerics(cfg, params, opts)
    return run_bench(cfg, params, opts)


# ---- ssd train-draft ---------------------------------------------------------------------------
def cmd_train_draft(ns) -> int:
    from .train.config import TrainDraftConfig, config_from_args
    from .train.distill import train_draft

    cfg = config_from_args(TrainDraftConfig, ns)
    if cfg is None:
        return 2
    train_draft(cfg, getattr(ns, "command_line", ""))
    return 0


def cmd_make_data(ns) -> int:
    from .train.config import DataConfig, config_from_args
    from .train.data import make_data, report

    cfg = config_from_args(DataConfig, ns)
    if cfg is None:
        return 2
    report(make_data(cfg))
    return 0


# ---- ssd serve / ssd service ------------------------------------------------------------------
def cmd_serve(ns) -> int:
    from ssd.services.run import serve_local

    cfg, _ = _configs(ns)
    return serve_local(ns, cfg, config_args(cfg))


def cmd_service(ns) -> int:
    from ssd.services.run import run_role

    cfg, _ = _configs(ns)
    return run_role(ns, cfg)


def _add_access(p) -> None:
    """Who may call the gateway (gRPC and HTTP)."""
    a = p.add_argument_group("client access (gateway)")
    a.add_argument("--api-keys", default="", help="comma-separated API keys; clients send 'Authorization: Bearer <key>' "
                                                  "(HTTP header or gRPC metadata). Also read from $SSD_API_KEYS. None = open")
    a.add_argument("--api-key-file", default="", help="file with one API key per line (# comments)")
    a.add_argument("--tls-cert", default="", help="PEM certificate: serve gRPC and HTTP over TLS (with --tls-key)")
    a.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    a.add_argument("--cors-origins", default="", help="comma-separated origins allowed to call the HTTP API from a browser")
    a.add_argument("--max-http-connections", type=int, default=1024,
                   help="concurrent HTTP connections and requests; beyond it HTTP 503")


def _add_generate(sub) -> None:
    """`ssd generate`: one generation in this process, streamed."""
    g = sub.add_parser("generate", help="generate text, streamed, with speed and speculation stats")
    g.add_argument("--prompt", required=True)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, stats)")
    _add_fields(g, EngineConfig)
    _add_fields(g, SpeculationConfig)
    _add_fields(g, SamplingParams)
    g.set_defaults(func=cmd_generate)


def _add_bench(sub) -> None:
    """`ssd bench`: the engines side by side in process, or the services under load (--serve)."""
    b = sub.add_parser("bench", help="AR vs SD vs SSD (+ Hugging Face references) on the same pair and prompts")
    b.add_argument("--prompts", help="JSONL file, one {\"prompt\": ...} per line, or sharegpt-heldout "
                   "(held-out ShareGPT first turns) (default: built-in set)")
    b.add_argument("--num-prompts", type=int, default=0, help="use only the first N prompts (0 = all)")
    b.add_argument("--modes", default="ar,sd,ssd")
    b.add_argument("--no-hf", action="store_true", help="skip the Hugging Face transformers references")
    b.add_argument("--no-llama-cpp", action="store_true",
                   help="skip llama.cpp on the target's GGUF file (run where llama-cpp-python is installed)")
    b.add_argument("--numerics", action="store_true",
                   help="instead: forward costs and AR tokens/s in fp32 and bf16, batch-invariant vs plain kernels, vs HF")
    b.add_argument("--json", action="store_true", help="print the result JSON to stdout")
    b.add_argument("--out", default="bench-results", help="directory for the JSON and PNG")
    b.add_argument("--repeats", type=int, default=1,
                   help="run every system (Hugging Face's included; with --serve every cell) this many times, in turn, "
                        "and report the median tokens/s and the median and range of the ratios taken within each repeat")
    b.add_argument("--serve", action="store_true",
                   help="instead: start the services (as `ssd serve`) and drive the gateway with concurrent streaming "
                        "clients, every --modes as the request's mode on one SSD target: throughput, TTFT, inter-token "
                        "latency, cache hit rate, backup use per concurrency level (serve.json, serve.png)")
    b.add_argument("--concurrency", default="1,2,4,8,16", help="--serve: concurrent clients per level, comma-separated")
    b.add_argument("--sampling", default="greedy,sampled,seeded",
                   help="--serve: greedy (temperature 0), sampled (--temperature, 1.0 when it is 0; --top-k, --top-p; "
                        "no seed, as chat clients send) and/or seeded (the same, request i with seed --seed + i: "
                        "reproducible, checked identical across modes)")
    _add_fields(b, EngineConfig, skip=("mode",))
    _add_fields(b, SpeculationConfig)
    _add_fields(b, SamplingParams)
    b.set_defaults(func=cmd_bench)


def _add_training(sub) -> None:
    """`ssd train-draft` and `ssd make-data`."""
    from .train.config import TrainDraftConfig  # a plain dataclass; the trainer itself is imported lazily

    t = sub.add_parser("train-draft", help="distil a small same-tokenizer draft from the target (writes a draft dir)")
    t.add_argument("--out", required=True, help="draft directory to write; OUT/train_state holds resumable state")
    _add_fields(t, TrainDraftConfig, skip=("out",))
    t.set_defaults(func=cmd_train_draft)

    from .train.config import DataConfig

    md = sub.add_parser("make-data", help="the target answers ShareGPT (and generated) prompts; stores token ids, "
                                          "its top-k distributions and optionally its hidden states, in resumable shards")
    _add_fields(md, DataConfig)
    md.set_defaults(func=cmd_make_data)


def _add_serve(sub) -> None:
    """`ssd serve`: the three services as local processes."""
    sv = sub.add_parser("serve", help="gateway, target and draft as local processes (no cluster, no Redis)")
    sv.add_argument("--prompt", help="send this chat prompt through the gateway, print the answer and stats, then stop")
    sv.add_argument("--port", type=int, default=50051, help="gateway gRPC port (0 = any free port)")
    sv.add_argument("--http-port", type=int, default=8000, help="gateway OpenAI-compatible HTTP port (0 = any, -1 = off)")
    sv.add_argument("--redis-url", default="", help="speculation index in Redis (default: in-process map)")
    sv.add_argument("--metrics-port", type=int, default=-1,
                    help="Prometheus /metrics of the three services: N = gateway N, target N+1, draft N+2; "
                         "0 = free ports (printed); -1 = off")
    sv.add_argument("--tensor-channel", default="auto", choices=["inline", "gloo", "nccl", "auto"],
                    help="how full q rows travel from draft to target (auto: nccl on GPUs, gloo on CPU, else inline)")
    _add_access(sv)
    _add_fields(sv, EngineConfig, skip=("mode",))
    _add_fields(sv, SpeculationConfig)
    _add_fields(sv, SamplingParams)
    sv.set_defaults(func=cmd_serve)


def _add_service(sub) -> None:
    """`ssd service ROLE`: one service, as in a pod."""
    se = sub.add_parser("service", help="run one service (as in a pod)")
    se.add_argument("role", choices=["gateway", "target", "draft"])
    se.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 in a pod)")
    se.add_argument("--port", type=int, default=0, help="gRPC port (0 = any free port, printed on start)")
    se.add_argument("--http-port", type=int, default=-1, help="gateway: OpenAI-compatible HTTP port (-1 = off)")
    se.add_argument("--targets", default="", help="gateway: comma-separated target addresses (static discovery)")
    se.add_argument("--drafts", default="", help="gateway: comma-separated draft addresses (static discovery)")
    se.add_argument("--discovery", default="static", choices=["static", "kubernetes"],
                    help="gateway: static addresses, or ready pods from the Kubernetes API (EndpointSlices)")
    se.add_argument("--k8s-namespace", default="", help="gateway: namespace to watch (default: $POD_NAMESPACE)")
    se.add_argument("--target-service", default="ssd-target", help="gateway: Kubernetes Service of the target pods")
    se.add_argument("--draft-service", default="ssd-draft", help="gateway: Kubernetes Service of the draft pods")
    se.add_argument("--draft-address", default="", help="target: comma-separated draft addresses (empty = target-only; "
                                                         "the gateway may name more per request)")
    se.add_argument("--draft-wait-s", type=float, default=60.0,
                    help="target: how long to wait at start for a draft to answer before serving target-only")
    se.add_argument("--tensor-channel", default="auto", choices=["inline", "gloo", "nccl", "auto"],
                    help="target: how full q rows travel from the draft (auto: nccl on GPUs, gloo on CPU, else inline)")
    se.add_argument("--redis-url", default="", help="target, draft: speculation index in Redis (default: in-process "
                                                     "map in the target; the draft publishes only with Redis)")
    se.add_argument("--model-name", default="smollm2-135m-instruct", help="gateway: served model name")
    se.add_argument("--grace-s", type=float, default=30.0, help="SIGTERM drain period (seconds)")
    se.add_argument("--metrics-port", type=int, default=-1, help="Prometheus /metrics port (0 = any free port, -1 = off)")
    _add_access(se)
    _add_fields(se, EngineConfig, skip=("mode",))
    _add_fields(se, SpeculationConfig)
    se.set_defaults(func=cmd_service)


def _add_trace(sub) -> None:
    """`ssd trace`: a PNG timeline of a request's round spans."""
    tr = sub.add_parser("trace", help="draw a PNG timeline of a request's verify/speculate spans (OTLP file or live)")
    from .services import trace_view  # matplotlib and the OTLP receiver load only when it runs

    trace_view.add_arguments(tr)
    tr.set_defaults(func=trace_view.run)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ssd", description="Speculative Speculative Decoding (Saguaro)")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in (_add_generate, _add_bench, _add_training, _add_serve, _add_service, _add_trace):
        add(sub)
    ns = p.parse_args(argv)
    ns.command_line = "ssd " + " ".join(sys.argv[1:] if argv is None else argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
