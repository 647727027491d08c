"""Control overhead per round on loopback: one empty round through each draft transport
(local process pipe, gRPC stream) and one batched speculation-index lookup (in-process map,
Redis). Prints p50/p99 in microseconds.  python -m ssd.benchmarks.control [--redis-url URL]"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def _percentiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50_us": 1e6 * xs[len(xs) // 2], "p99_us": 1e6 * xs[min(len(xs) - 1, int(len(xs) * 0.99))],
            "mean_us": 1e6 * statistics.fmean(xs), "n": len(xs)}


def _tiny_draft(path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)


def _round_trip(link, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        link.send(("round", i, [], [], {}, []))
        link.recv()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--batch", type=int, default=8, help="index keys looked up per step")
    ns = ap.parse_args(argv)
    torch.set_num_threads(1)
    from ssd.config import SpeculationConfig
    from ssd.models.draft import DraftDescription
    from ssd.engine.draft_link import ProcessDraftLink
    from ssd.speculation.index import LocalIndex, context_key

    from ssd.services.draft.server import serve
    from ssd.services.draft_link import GrpcDraftLink
    from ssd.services.index_redis import RedisIndex

    res = {}
    with tempfile.TemporaryDirectory() as d:
        _tiny_draft(d)
        speculation = SpeculationConfig(num_speculative_tokens=4)
        link = ProcessDraftLink(DraftDescription(d), speculation, 4, 64, 1)
        _round_trip(link, 50)
        res["draft round, local process pipe"] = _percentiles(_round_trip(link, ns.rounds))
        link.close()
        server, port = serve(DraftDescription(d), speculation, max_seqs=4, max_model_len=64)
        glink = GrpcDraftLink(f"127.0.0.1:{port}", k=4)
        _round_trip(glink, 50)
        res["draft round, gRPC stream"] = _percentiles(_round_trip(glink, ns.rounds))
        glink.close()
        server.stop(0)
    keys = [context_key(list(range(i, i + 300)), "fp", ("greedy",), 4) for i in range(ns.batch)]
    for name, idx in (("index lookup, in-process map", LocalIndex()), ("index lookup, Redis MGET", RedisIndex(ns.redis_url, timeout_s=1.0))):
        idx.put_many({k: [1, 2, 3, 4] for k in keys[: ns.batch // 2]})
        xs = []
        for _ in range(ns.rounds):
            t0 = time.perf_counter()
            idx.get_many(keys)
            xs.append(time.perf_counter() - t0)
        res[f"{name} ({ns.batch} keys)"] = _percentiles(xs)
    t0 = time.perf_counter()
    for _ in range(ns.rounds):
        [context_key(list(range(i, i + 300)), "fp", ("greedy",), 4) for i in range(ns.batch)]
    res[f"index key hashing ({ns.batch} contexts of 300 tokens)"] = {"mean_us": 1e6 * (time.perf_counter() - t0) / ns.rounds}
    for name, r in res.items():
        print(f"{name:<52} " + "  ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
