"""Adaptive speculation vs every fixed K, for SD and SSD, in one run (docs/algorithm.md section 7).

    python -m ssd.benchmarks.adaptive --prompts sharegpt-heldout --num-prompts 6 --max-tokens 64

Runs SD and SSD at each fixed K of --ks, then adaptive (K chosen per round and sequence, at most
--k-max) without and with the draft-confidence stop p_min, and (SSD) adaptive with cached
speculations verified whole instead of cut (section 7d), on the same prompts and pair. Prints
decode tokens/s and each system's ratio to the best fixed K of its mode (and SSD over SD), and
writes JSON + PNG. Ratios within one run are the result; the machine is shared.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from ..config import EngineConfig, SamplingParams, SpeculationConfig
from ..engine import ModelPair
from . import save_results
from .engines import _run_engine, decode_tps, load_prompts


def configs(ks: list[int], k_max: int, p_min: float) -> list[tuple[str, SpeculationConfig]]:
    """(label, speculation settings) of every system, fixed K first."""
    base = SpeculationConfig()
    out = [(f"K={k}", dataclasses.replace(base, num_speculative_tokens=k)) for k in ks]
    out.append(("adaptive", dataclasses.replace(base, num_speculative_tokens=k_max, adaptive=True)))
    # the same without section 7d (cached speculations verified whole): what the cut buys (SSD only)
    out.append(("adaptive, whole cached", dataclasses.replace(base, num_speculative_tokens=k_max, adaptive=True,
                                                              cut_cached=False)))
    if p_min > 0:
        out.append((f"adaptive p_min={p_min:g}",
                    dataclasses.replace(base, num_speculative_tokens=k_max, adaptive=True, p_min=p_min)))
    return out


def systems(modes: list[str], ks: list[int], k_max: int, p_min: float) -> list[tuple[str, str, SpeculationConfig]]:
    """(mode, label, settings) of every run; whole-vs-cut cached speculations only in SSD (SD has none)."""
    return [(mode, label, spec) for mode in modes for label, spec in configs(ks, k_max, p_min)
            if mode == "ssd" or spec.cut_cached]


def ratios(rows: list[dict]) -> None:
    """Adds to each row its tokens/s over the best fixed K of its mode, and SSD rows over the SD
    row of the same label."""
    for mode in {r["mode"] for r in rows}:
        fixed = [r for r in rows if r["mode"] == mode and r["adaptive"] is False]
        best = max(fixed, key=lambda r: r["decode_tokens_per_s"])
        for r in rows:
            if r["mode"] == mode:
                r["best_fixed"] = best["label"]
                r["vs_best_fixed"] = r["decode_tokens_per_s"] / best["decode_tokens_per_s"]
    sd = {r["label"]: r for r in rows if r["mode"] == "sd"}
    for r in rows:
        if r["mode"] == "ssd" and r["label"] in sd:
            r["vs_sd"] = r["decode_tokens_per_s"] / sd[r["label"]]["decode_tokens_per_s"]


def run(ns) -> dict:
    prompts = load_prompts(ns.prompts, ns.num_prompts)
    cfg = EngineConfig(target_threads=ns.target_threads, draft_threads=ns.draft_threads, max_batch=1)
    pair = ModelPair.load(cfg.replace(mode="ar"))
    ids = [pair.tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}]) for p in prompts]
    params = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, seed=0 if ns.temperature else None)
    rows = []
    for mode, label, spec in systems(ns.modes.split(","), ns.ks, ns.k_max, ns.p_min):
        total, _ = _run_engine(cfg.replace(mode=mode, speculation=spec), pair, ids, params, f"{mode} {label}")
        row = {"mode": mode, "label": label, "adaptive": spec.adaptive, "K": spec.num_speculative_tokens,
               "p_min": spec.p_min, "tokens": total.tokens, "wall_s": total.wall,
               "decode_tokens_per_s": decode_tps(total),
               "tokens_per_round": (total.tokens - total.prefill_tokens) / total.rounds if total.rounds else None,
               "drafted_per_round": total.num_draft_tokens / total.num_drafts if total.num_drafts else None,
               "acceptance_rate": total.num_accepted_tokens / total.num_draft_tokens if total.num_draft_tokens else None,
               "n_jit": total.n_jit, "n_backup": total.n_backup,
               "cut_per_round": total.cut_draft_tokens / total.rounds if total.rounds else None,
               "load_avg_1m": os.getloadavg()[0]}
        rows.append(row)
        print(f"{mode:>3} {label:<22} {row['decode_tokens_per_s']:7.2f} tok/s  "
              f"{row['drafted_per_round'] or 0:4.2f} drafted/round  {row['tokens_per_round'] or 0:4.2f} tokens/round",
              flush=True)
    ratios(rows)
    return {"command": " ".join(["python -m ssd.benchmarks.adaptive"] + sys.argv[1:]), "prompts": ns.prompts or "built-in",
            "num_prompts": len(ids), "max_tokens": ns.max_tokens, "temperature": ns.temperature,
            "cores": os.cpu_count(), "rows": rows}


def print_table(result: dict) -> None:
    print(f"\n{'mode':>4} {'system':<22} {'tok/s':>7} {'vs best fixed':>14} {'SSD/SD':>7}")
    for r in result["rows"]:
        vs_sd = f"{r['vs_sd']:.2f}" if "vs_sd" in r else ""
        print(f"{r['mode']:>4} {r['label']:<22} {r['decode_tokens_per_s']:7.2f} "
              f"{r['vs_best_fixed']:9.2f} ({r['best_fixed']}) {vs_sd:>7}")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in result["rows"] if r["mode"] == mode]
        colors = ["tab:orange" if r["adaptive"] else "tab:blue" for r in rows]
        ax.bar([r["label"] for r in rows], [r["decode_tokens_per_s"] for r in rows], color=colors)
        ax.set_title(f"{mode.upper()}: decode tokens/s (orange: adaptive)")
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(f"{result['num_prompts']} prompts ({result['prompts']}) x {result['max_tokens']} tokens, "
                 f"T={result['temperature']:g}, {result['cores']} shared cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default="sharegpt-heldout", help="sharegpt-heldout | a JSONL file | '' (built-in)")
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--modes", default="sd,ssd")
    ap.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3, 4, 6])
    ap.add_argument("--k-max", type=int, default=6, help="adaptive K's upper bound (num_speculative_tokens)")
    ap.add_argument("--p-min", type=float, default=0.5, help="also run adaptive with this draft-confidence stop (0: skip)")
    ap.add_argument("--target-threads", type=int, default=1)
    ap.add_argument("--draft-threads", type=int, default=1)
    ap.add_argument("--out", default="bench_results/adaptive")
    ns = ap.parse_args(argv)
    result = run(ns)
    print_table(result)
    js, png = save_results(ns.out, "adaptive", result, plot)
    print(f"\nwrote {js} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
