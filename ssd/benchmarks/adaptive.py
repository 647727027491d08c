"""Adaptive speculation vs every fixed K, for SD and SSD, in one run (docs/algorithm.md section 7).

    python -m ssd.benchmarks.adaptive --prompts sharegpt-heldout --num-prompts 6 --max-tokens 64

Runs SD and SSD at each fixed K of --ks, then adaptive (K chosen per round and sequence, at most
--k-max) without and with the draft-confidence stop p_min, and (SSD) adaptive with cached
speculations cut to what the cost model says pays (section 7d, off by default), on the same
prompts and pair. Prints
decode tokens/s and each system's ratio to the best fixed K of its mode (and SSD over SD), and
writes JSON + PNG. Ratios within one run are the result; the machine is shared.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

from ..config import EngineConfig, SamplingParams, SpeculationConfig
from ..engine import ModelPair
from . import paired_ratio, repeat_error_bars, save_results
from ..engine.base import EngineStats
from .engines import accumulate_stats, run_engine, decode_tps, load_prompts


def configs(ks: list[int], k_max: int, p_min: float) -> list[tuple[str, SpeculationConfig]]:
    """(label, speculation settings) of every system, fixed K first."""
    base = SpeculationConfig()
    out = [(f"K={k}", dataclasses.replace(base, num_speculative_tokens=k, adaptive=False)) for k in ks]
    out.append(("adaptive", dataclasses.replace(base, num_speculative_tokens=k_max, adaptive=True, cut_cached=False)))
    # the same with section 7d (cached speculations cut to m* tokens): what the cut buys (SSD only)
    out.append(("adaptive, cut cached", dataclasses.replace(base, num_speculative_tokens=k_max, adaptive=True,
                                                            cut_cached=True)))
    if p_min > 0:
        out.append((f"adaptive p_min={p_min:g}",
                    dataclasses.replace(base, num_speculative_tokens=k_max, adaptive=True, p_min=p_min)))
    return out


def systems(modes: list[str], ks: list[int], k_max: int, p_min: float) -> list[tuple[str, str, SpeculationConfig]]:
    """(mode, label, settings) of every run; whole-vs-cut cached speculations only in SSD (SD has none)."""
    return [(mode, label, spec) for mode in modes for label, spec in configs(ks, k_max, p_min)
            if mode == "ssd" or not spec.cut_cached]


def _per_repeat(row: dict) -> list[float]:
    return row.get("decode_tokens_per_s_repeats") or [row["decode_tokens_per_s"]]


def _paired(row: dict, ref: dict) -> tuple[float, list[float]]:
    """row's decode tokens/s over ref's, within each repeat: (median, [lowest, highest])."""
    return paired_ratio(_per_repeat(row), _per_repeat(ref), f"{row['mode']} {row['label']}")


def ratios(rows: list[dict]) -> None:
    """Adds to each row its tokens/s over the best fixed K of its mode (the fixed K with the highest
    median), and SSD rows over the SD row of the same label; with repeats, the median and range
    of the ratios within each repeat."""
    for mode in {r["mode"] for r in rows}:
        fixed = [r for r in rows if r["mode"] == mode and r["adaptive"] is False]
        best = max(fixed, key=lambda r: r["decode_tokens_per_s"])
        for r in rows:
            if r["mode"] == mode:
                r["best_fixed"] = best["label"]
                r["vs_best_fixed"], r["vs_best_fixed_range"] = _paired(r, best)
    sd = {r["label"]: r for r in rows if r["mode"] == "sd"}
    for r in rows:
        if r["mode"] == "ssd" and r["label"] in sd:
            r["vs_sd"], r["vs_sd_range"] = _paired(r, sd[r["label"]])


def run(ns) -> dict:
    prompts = load_prompts(ns.prompts, ns.num_prompts)
    cfg = EngineConfig(target_threads=ns.target_threads, draft_threads=ns.draft_threads, max_batch=1)
    pair = ModelPair.load(cfg.replace(mode="ar"))
    ids = [pair.tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}]) for p in prompts]
    params = SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, seed=0 if ns.temperature else None)
    plan = systems(ns.modes.split(","), ns.ks, ns.k_max, ns.p_min)
    done = [[] for _ in plan]  # per system: (stats, 1-minute load as it ended) per repeat
    # each repeat runs every system once, in turn: a slow stretch of the shared machine then hits
    # the systems of one repeat alike, and ratios are taken within a repeat
    for rep in range(ns.repeats):
        for i, (mode, label, spec) in enumerate(plan):
            total, _ = run_engine(cfg.replace(mode=mode, speculation=spec), pair, ids, params, f"{mode} {label}")
            done[i].append((total, os.getloadavg()[0]))
            print(f"{f'[{rep + 1}/{ns.repeats}] ' if ns.repeats > 1 else ''}{mode:>3} {label:<22} "
                  f"{decode_tps(total):7.2f} tok/s", flush=True)
    rows = []
    for (mode, label, spec), reps in zip(plan, done):
        total = EngineStats()  # counts pooled over the repeats
        for st, _ in reps:
            accumulate_stats(total, st)
        per = [decode_tps(st) for st, _ in reps]
        row = {"mode": mode, "label": label, "adaptive": spec.adaptive, "K": spec.num_speculative_tokens,
               "p_min": spec.p_min, "tokens": total.tokens, "wall_s": total.wall,
               "decode_tokens_per_s": statistics.median(per), "decode_tokens_per_s_repeats": per,
               "tokens_per_round": (total.tokens - total.prefill_tokens) / total.rounds if total.rounds else None,
               "drafted_per_round": total.num_draft_tokens / total.num_drafts if total.num_drafts else None,
               "acceptance_rate": total.num_accepted_tokens / total.num_draft_tokens if total.num_draft_tokens else None,
               "n_jit": total.n_jit, "n_backup": total.n_backup,
               "cut_per_round": total.cut_draft_tokens / total.rounds if total.rounds else None,
               "load_avg_1m": reps[0][1], "load_avg_1m_per_repeat": [x for _, x in reps]}
        rows.append(row)
        print(f"{mode:>3} {label:<22} {row['decode_tokens_per_s']:7.2f} tok/s  "
              f"{row['drafted_per_round'] or 0:4.2f} drafted/round  {row['tokens_per_round'] or 0:4.2f} tokens/round",
              flush=True)
    ratios(rows)
    return {"command": " ".join(["python -m ssd.benchmarks.adaptive"] + sys.argv[1:]), "prompts": ns.prompts or "built-in",
            "num_prompts": len(ids), "max_tokens": ns.max_tokens, "temperature": ns.temperature,
            "cores": os.cpu_count(), "repeats": ns.repeats, "rows": rows}


def print_table(result: dict) -> None:
    n = result.get("repeats", 1)
    if n > 1:
        print(f"\nover {n} repeats: tok/s is the median; each ratio the median of the ratios within a repeat "
              "[lowest, highest]")
    print(f"\n{'mode':>4} {'system':<22} {'tok/s':>7} {'vs best fixed':>14} {'SSD/SD':>7}")

    def span(r, key):
        lo, hi = r.get(f"{key}_range") or (None, None)
        return f" [{lo:.2f}, {hi:.2f}]" if n > 1 and lo is not None else ""

    for r in result["rows"]:
        vs_sd = f"{r['vs_sd']:.2f}{span(r, 'vs_sd')}" if "vs_sd" in r else ""
        print(f"{r['mode']:>4} {r['label']:<22} {r['decode_tokens_per_s']:7.2f} "
              f"{r['vs_best_fixed']:9.2f}{span(r, 'vs_best_fixed')} ({r['best_fixed']}) {vs_sd}")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in result["rows"] if r["mode"] == mode]
        colors = ["tab:orange" if r["adaptive"] else "tab:blue" for r in rows]
        tps = [r["decode_tokens_per_s"] for r in rows]
        reps = [_per_repeat(r) for r in rows]
        ax.bar([r["label"] for r in rows], tps, color=colors, yerr=repeat_error_bars(tps, reps), capsize=3)
        ax.set_title(f"{mode.upper()}: decode tokens/s (orange: adaptive)")
        ax.tick_params(axis="x", rotation=45)
    n = result.get("repeats", 1)
    fig.suptitle(f"{result['num_prompts']} prompts ({result['prompts']}) x {result['max_tokens']} tokens, "
                 f"T={result['temperature']:g}, {result['cores']} shared cores"
                 + (f", median of {n} repeats" if n > 1 else ""))
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
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every system this many times, in turn; report medians and the range of the "
                         "ratios within a repeat")
    ap.add_argument("--out", default="bench_results/adaptive")
    ns = ap.parse_args(argv)
    if ns.repeats < 1:
        ap.error("--repeats must be at least 1")
    result = run(ns)
    print_table(result)
    js, png = save_results(ns.out, "adaptive", result, plot)
    print(f"\nwrote {js} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
