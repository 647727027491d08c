"""Tokens/s through the services vs the in-process engine, same pair, same prompts, one run.

    python -m ssd.benchmarks.services [--num-prompts 6] [--max-tokens 96] [--out DIR]

In-process: `ssd generate`'s path (SSDEngine, the draft in a spawned process over a pipe and
shared memory). Services: draft, target and gateway as three local processes on loopback (what
`ssd serve` starts), driven through the gateway's gRPC Generate with the same token ids. The two
systems alternate prompt by prompt so machine noise hits both alike. Greedy outputs must be
identical; the ratio services / in-process is the number that matters (the floor we hold it to: >= 0.95).
Extra service variants: --traced adds two service stacks exporting spans to an in-process OTLP
receiver, at the default sampling ratio and at 1.0 (the ceiling we hold tracing to: <= 3 %).
"""
from __future__ import annotations

from . import save_results

import argparse
import os
import sys
import time


def _via_gateway(stub, ids, params, pb, sampling_to_pb):
    t0 = time.perf_counter()
    out = []
    for r in stub.Generate(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids), sampling=sampling_to_pb(params)),
                           timeout=3600):
        out.extend(r.token_ids)
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--traced", action="store_true", help="also run the services with tracing exported (OTLP)")
    p.add_argument("--control", action="store_true",
                   help="also run a second, identical untraced services stack (an A/A run: the noise floor)")
    p.add_argument("--out", default="bench-results/services")
    ns = p.parse_args(argv)

    import grpc
    from tqdm import tqdm

    from ssd.benchmarks.engines import load_prompts
    from ssd.config import config_args
    from ssd.config import EngineConfig, SamplingParams
    from ssd.engine import ModelPair, build_engine
    from ssd.engine.base import EngineStats

    from ssd.services.common import CHANNEL_OPTIONS
    from ssd.services.convert import sampling_to_pb
    from ssd.services.protos import pb, pb_grpc
    from ssd.services.run import start_stack, stop_stack

    cfg = EngineConfig(mode="ssd")
    params = SamplingParams(max_tokens=ns.max_tokens, temperature=0.0)
    pair = ModelPair.load(cfg.replace(mode="ar"))
    prompts = load_prompts(None, ns.num_prompts)
    prompt_ids = [pair.tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}]) for r in prompts]
    common = config_args(cfg)

    variants = {"services": None}
    if ns.control:
        variants["services (A/A)"] = None
    receiver = None
    if ns.traced:
        from ssd.services.otlp_receiver import OTLPReceiver

        receiver = OTLPReceiver().start()
        # the default sampling ratio (telemetry.DEFAULT_SAMPLE_RATIO), and every request traced
        variants["services+tracing"] = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
        variants["services+tracing@1.0"] = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                                                OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="1.0")
    systems, procs = {}, []
    try:
        for name, env in variants.items():
            port = start_stack(common, procs, env=env)["gateway"]["port"]
            systems[name] = pb_grpc.GatewayStub(grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS))
        totals = {name: [0, 0.0] for name in ["in-process", *variants]}
        outputs = {name: [] for name in totals}
        walls = {name: [] for name in totals}
        with build_engine(cfg, pair) as eng:
            warm = SamplingParams(max_tokens=8)
            eng.generate([prompt_ids[0]], warm)
            for stub in systems.values():
                _via_gateway(stub, prompt_ids[0], warm, pb, sampling_to_pb)
            for i, ids in enumerate(tqdm(prompt_ids, desc="prompts")):
                names = ["in-process", *variants]
                order = names[i % len(names):] + names[: i % len(names)]  # every system takes every position in turn
                for name in order:
                    if name == "in-process":
                        eng.stats = EngineStats()
                        t0 = time.perf_counter()
                        out = eng.generate([ids], params)[0].output_ids
                        wall = time.perf_counter() - t0
                    else:
                        out, wall = _via_gateway(systems[name], ids, params, pb, sampling_to_pb)
                    totals[name][0] += len(out)
                    totals[name][1] += wall
                    outputs[name].append(out)
                    walls[name].append(wall)
    finally:
        stop_stack(procs)
    base = totals["in-process"][0] / totals["in-process"][1]
    result = {"command": "python -m ssd.benchmarks.services " + " ".join(argv if argv is not None else sys.argv[1:]),
              "num_prompts": len(prompt_ids), "max_tokens": ns.max_tokens, "systems": {}}
    for name, (tokens, wall) in totals.items():
        tps = tokens / wall
        row = {"tokens": tokens, "seconds": wall, "tokens_per_s": tps, "ratio_vs_in_process": tps / base,
               "identical_to_in_process": outputs[name] == outputs["in-process"], "per_prompt_seconds": walls[name]}
        # paired per prompt (same prompt, same tokens): geometric mean speed ratio and its 95 % interval
        for ref in ("in-process", "services"):
            if name != ref:
                row[f"paired_vs_{ref}"] = paired_ratio(walls[ref], walls[name])
        result["systems"][name] = row
        vs = row.get("paired_vs_services")
        extra = f"  vs services {vs['mean']:.3f} [{vs['lo']:.3f}, {vs['hi']:.3f}]" if vs else ""
        print(f"{name:22s} {tps:7.2f} tok/s  ratio {tps / base:5.3f}{extra}  identical={row['identical_to_in_process']}")
    if receiver is not None:
        result["spans_received"] = len(receiver.spans())
        receiver.stop()
    js, png = save_results(ns.out, "services", result, plot)
    print(f"wrote {js} and {png}", file=sys.stderr)
    return 0


def paired_ratio(ref_walls: list[float], walls: list[float]) -> dict:
    """Speed of a system relative to ref, prompt by prompt: exp(mean log(ref / this)) with a 95 %
    t interval. Above 1: faster than ref."""
    import math

    from scipy import stats

    logs = [math.log(r / w) for r, w in zip(ref_walls, walls)]
    n = len(logs)
    mean = sum(logs) / n
    sd = (sum((x - mean) ** 2 for x in logs) / (n - 1)) ** 0.5 if n > 1 else 0.0
    half = stats.t.ppf(0.975, n - 1) * sd / n ** 0.5 if n > 1 else 0.0
    return {"mean": math.exp(mean), "lo": math.exp(mean - half), "hi": math.exp(mean + half), "n": n}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in result["systems"] if n != "in-process"]
    rows = [result["systems"][n]["paired_vs_in-process"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(range(len(names)), [r["mean"] for r in rows],
           yerr=[[r["mean"] - r["lo"] for r in rows], [r["hi"] - r["mean"] for r in rows]], capsize=5, color="#4c72b0")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(0.95, color="#d62728", lw=0.8, ls="--", label="0.95 floor")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("tokens/s vs in-process engine")
    ax.set_ylim(0.8, 1.1)
    ax.set_title(f"{result['num_prompts']} prompts x {result['max_tokens']} tokens, greedy (95 % paired intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
