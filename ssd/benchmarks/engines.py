"""`ssd bench`: AR vs SD vs SSD on the same model pair, prompts and machine, in one run.

Ratios, never absolute times, are the result (the machine is shared and noisy). Hugging Face
transformers `generate` and assisted generation on the same weights are external references.
The paper's Thm 7 ideal is computed from what SSD measured (p_hit, E_hit, E_miss, T_p, T_b, the
verify-pass time) and compared with the measured speed: measured/ideal = 1 - engine overhead.
"""
from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import EngineConfig, SamplingParams
from . import save_results
from ..engine import ModelPair, build_engine
from ..engine.base import EngineStats


SHAREGPT_HELDOUT = "sharegpt-heldout"


def load_prompts(path: str | None, limit: int = 0) -> list[dict]:
    """Bench prompts: the built-in set, a JSONL file, or "sharegpt-heldout" (first turns of the
    held-out ShareGPT conversations, 15,000 onward, under 600 characters; never trained on)."""
    if path == SHAREGPT_HELDOUT:
        from ..train.sharegpt import prompts as sharegpt_prompts

        rows = [{"prompt": p["messages"][0]["content"], "category": "sharegpt"}
                for p in sharegpt_prompts("heldout", max_chars=600) if p["kind"] == "first"]
        return rows[:limit] if limit else rows
    if path:
        text = Path(path).read_text()
    else:
        text = resources.files("ssd").joinpath("data/bench_prompts.jsonl").read_text()
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path or 'bench_prompts.jsonl'}:{i}: not JSON ({e})") from e
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{path or 'bench_prompts.jsonl'}:{i}: expected {{\"prompt\": \"...\"}}")
        rows.append({"prompt": row["prompt"], "category": row.get("category", "all")})
    if not rows:
        raise ValueError("no prompts")
    return rows[:limit] if limit else rows


def thm7_ideal(st: EngineStats) -> dict | None:
    """Paper Thm 7 from measured quantities. Costs are in units of one verify pass."""
    lookups = st.cache_hit + st.cache_late + st.cache_miss
    if not st.steps or not lookups:
        return None
    t_verify = st.t_verify / st.steps  # seconds per verify pass
    p_hit = (st.cache_hit + st.cache_late) / lookups
    e_hit = st.tokens_after_hit / st.rounds_after_hit if st.rounds_after_hit else 0.0
    e_miss = st.tokens_after_miss / st.rounds_after_miss if st.rounds_after_miss else 0.0
    t_p = (st.t_build / st.n_build) / t_verify if st.n_build else 0.0
    fallback_n = st.n_jit + st.n_backup
    t_b = ((st.t_jit + st.t_backup) / fallback_n) / t_verify if fallback_n else 0.0
    expected_tokens = p_hit * e_hit + (1 - p_hit) * e_miss
    cost = p_hit * max(1.0, t_p) + (1 - p_hit) * (1.0 + t_b)
    return {
        "p_hit": p_hit, "E_hit": e_hit, "E_miss": e_miss, "T_p": t_p, "T_b": t_b,
        "verify_s": t_verify,
        "tokens_per_verify_unit": expected_tokens / cost,  # = paper speedup vs AR if a verify cost one AR step
        "ideal_decode_tokens_per_s": expected_tokens / (cost * t_verify),
    }


def forward_costs(pair: ModelPair, k: int, context: int = 300, repeats: int = 15) -> dict:
    """Median forward latency (ms) of the target and the draft for 1 and K+1 new tokens after a
    `context`-token prefix, in this process's thread budget."""
    from ..kv_cache import append_batch

    def median_ms(model, n):
        cache = model.new_cache(1, context + n + 1)
        # a feature drafter also reads a feature per position (its cost is the same for any values)
        extra = (lambda m: (torch.zeros(1, m, model.cfg.hidden_size, dtype=model.dtype),)) \
            if getattr(model, "kind", None) == "feature" else (lambda m: ())
        model(torch.randint(0, 8000, (1, context)), *extra(context), append_batch([0], [0], context), cache)
        ts = []
        for _ in range(repeats):
            x = torch.randint(0, 8000, (1, n))
            t0 = time.perf_counter()
            model(x, *extra(n), append_batch([0], [context], n), cache)
            ts.append(time.perf_counter() - t0)
        return 1000 * sorted(ts)[len(ts) // 2]

    out = {"target_1": median_ms(pair.target, 1), f"target_{k + 1}": median_ms(pair.target, k + 1),
           "draft_1": median_ms(pair.draft_model(), 1)}
    out["draft_over_target_per_token"] = out["draft_1"] / out["target_1"]
    out["verify_over_ar_step"] = out[f"target_{k + 1}"] / out["target_1"]
    return out


def decode_tps(st: EngineStats) -> float:
    """Tokens/s after the first token (prefill and its token excluded): what Thm 7 models."""
    t = st.wall - st.t_prefill
    return (st.tokens - st.prefill_tokens) / t if t > 0 else 0.0


def _run_engine(cfg, pair, prompt_ids, params, label):
    with build_engine(cfg, pair) as eng:
        eng.generate([prompt_ids[0]], SamplingParams(max_tokens=8, temperature=params.temperature, seed=0))  # warm-up
        total = EngineStats()
        per_prompt = []
        for ids in tqdm(prompt_ids, desc=f"{label:>4}", leave=False):
            eng.stats = EngineStats()
            seq = eng.generate([ids], params)[0]
            per_prompt.append({"output_ids": seq.output_ids, "stats": eng.stats})
            _accumulate(total, eng.stats)
    return total, per_prompt


def _accumulate(total: EngineStats, st: EngineStats) -> None:
    for k, v in vars(st).items():
        if isinstance(v, (int, float)):
            setattr(total, k, getattr(total, k) + v)
        elif k == "accepted_per_pos":
            while len(total.accepted_per_pos) < len(v):
                total.accepted_per_pos.append(0)
            for i, x in enumerate(v):
                total.accepted_per_pos[i] += x


def _hf_references(pair: ModelPair, prompt_ids, params, k: int) -> dict:
    from transformers import AutoModelForCausalLM

    out = {}
    dtype = getattr(torch, pair.numerics.get("dtype", "float32"))  # the same dtype as our engines
    target = AutoModelForCausalLM.from_pretrained(pair.target_path, dtype=dtype).eval()
    assistant = _hf_assistant(pair).to(dtype)
    assistant.generation_config.num_assistant_tokens = k
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    assistant.generation_config.assistant_confidence_threshold = 0.0
    eos = list(pair.tokenizer.eos_token_ids)
    kw = dict(max_new_tokens=params.max_tokens, eos_token_id=eos, pad_token_id=eos[0])
    if params.greedy:
        kw["do_sample"] = False
    else:
        kw.update(do_sample=True, temperature=params.temperature, top_k=params.top_k or None, top_p=params.top_p)
    for label, extra in (("hf", {}), ("hf_assisted", {"assistant_model": assistant})):
        tokens, wall, outs = 0, 0.0, []
        ids0 = torch.tensor([prompt_ids[0]])
        target.generate(ids0, attention_mask=torch.ones_like(ids0), **{**kw, "max_new_tokens": 8}, **extra)  # warm-up
        for ids in tqdm(prompt_ids, desc=f"{label:>4}", leave=False):
            x = torch.tensor([ids])
            t0 = time.perf_counter()
            with torch.inference_mode():
                y = target.generate(x, attention_mask=torch.ones_like(x), **kw, **extra)
            wall += time.perf_counter() - t0
            new = y[0, x.shape[1]:].tolist()
            tokens += len(new)
            outs.append(new)
        out[label] = {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "outputs": outs}
    return out


def _hf_assistant(pair: ModelPair):
    """The draft our engines use, as a transformers model for assisted generation."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    d_desc = pair.draft_desc
    if d_desc.standin_layers is not None:
        m = AutoModelForCausalLM.from_pretrained(d_desc.path, dtype=torch.float32).eval()
        m.model.layers = m.model.layers[: d_desc.standin_layers]
        m.config.num_hidden_layers = d_desc.standin_layers
        head_ids = torch.arange(d_desc.head_vocab) if d_desc.head_vocab else None
    else:
        from safetensors.torch import load_file

        from ..models.draft_dir import WEIGHTS, is_draft_dir

        if not is_draft_dir(d_desc.path):
            return AutoModelForCausalLM.from_pretrained(d_desc.path, dtype=torch.float32).eval()
        d = json.loads((Path(d_desc.path) / "config.json").read_text())
        d.pop("ssd_draft")
        m = LlamaForCausalLM(LlamaConfig(**d)).float().eval()
        own = {k: v.float() for k, v in load_file(str(Path(d_desc.path) / WEIGHTS)).items()}
        head_ids = own.pop("head_token_ids").long()
        head = own.pop("lm_head.weight")
        with torch.no_grad():
            m.model.embed_tokens.weight.copy_(pair.target.embed.weight)
            m.lm_head.weight.zero_()
            m.lm_head.weight[head_ids] = head
        m.load_state_dict(own, strict=False)
    if head_ids is not None:
        # a reduced-vocabulary head: transformers needs full-vocabulary logits, so mask the rest
        mask = torch.ones(m.config.vocab_size, dtype=torch.bool)
        mask[head_ids] = False
        m.lm_head.register_forward_hook(lambda mod, inp, out: out.masked_fill(mask, float("-inf")))
    return m


def _same_prefix(a: list[int], b: list[int]) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def run_bench(cfg: EngineConfig, params: SamplingParams, ns) -> int:
    prompts = load_prompts(ns.prompts, ns.num_prompts)
    modes = [m.strip() for m in ns.modes.split(",") if m.strip()]
    pair = ModelPair.load(cfg.replace(mode="ar"))
    tok = pair.tokenizer
    prompt_ids = [tok.apply_chat_template([{"role": "user", "content": p["prompt"]}]) for p in prompts]
    torch.set_num_threads(cfg.target_threads)
    costs = forward_costs(pair, cfg.speculation.num_speculative_tokens)
    runs = {}
    for mode in modes:
        total, per = _run_engine(cfg.replace(mode=mode), pair, prompt_ids, params, mode)
        runs[mode] = (total, per)
        print(f"{mode:>4}: {total.tokens / total.wall:7.2f} tok/s  ({total.tokens} tokens, {total.wall:.1f} s)", flush=True)
    if "ar" in modes and cfg.batch_invariant:
        # the baseline a skeptic picks: AR on the plain (fastest single-token, non-invariant) kernels
        total, per = _run_engine(cfg.replace(mode="ar", batch_invariant=False), pair, prompt_ids, params, "ar-plain")
        runs["ar-plain"] = (total, per)
        print(f"ar with plain kernels: {total.tokens / total.wall:7.2f} tok/s", flush=True)
    hf = {} if ns.no_hf else _hf_references(pair, prompt_ids, params, cfg.speculation.num_speculative_tokens)

    base = runs.get("ar")
    result = {
        "command": getattr(ns, "command_line", None),
        "target": pair.target_path,
        "draft": pair.draft_desc.describe(),
        "params": vars(params),
        "engine": {k: v for k, v in vars(cfg).items() if k != "speculation"},
        "speculation": vars(cfg.speculation),
        "numerics": pair.numerics,
        "threads": {"target": cfg.target_threads, "draft_process": cfg.draft_threads, "torch_default": torch.get_num_threads()},
        "num_prompts": len(prompts),
        "forward_ms": costs,
        "modes": {},
        "hf": {k: {kk: vv for kk, vv in v.items() if kk != "outputs"} for k, v in hf.items()},
    }
    for mode, (st, per) in runs.items():
        row = st.summary()
        row["decode_tokens_per_s"] = decode_tps(st)
        if base is not None:
            row["speedup_vs_ar"] = row["tokens_per_s"] / (base[0].tokens / base[0].wall)
        if "ar-plain" in runs:
            row["speedup_vs_plain_ar"] = row["tokens_per_s"] / (runs["ar-plain"][0].tokens / runs["ar-plain"][0].wall)
            if params.greedy:
                row["identical_to_ar"] = all(p["output_ids"] == b["output_ids"] for p, b in zip(per, base[1]))
        cats = {}
        for p, q in zip(prompts, per):
            c = cats.setdefault(p["category"], [0, 0])
            c[0] += q["stats"].num_accepted_tokens
            c[1] += q["stats"].num_draft_tokens
        if mode not in ("ar", "ar-plain"):
            row["acceptance_by_category"] = {c: (a / d if d else None) for c, (a, d) in cats.items()}
        if mode == "ssd":
            ideal = thm7_ideal(st)
            if ideal:
                ideal["measured_over_ideal"] = row["decode_tokens_per_s"] / ideal["ideal_decode_tokens_per_s"]
            row["thm7"] = ideal
        if mode == "sd" and st.steps:
            t_v, t_d = st.t_verify / st.steps, st.t_draft / st.steps
            e = (st.tokens - st.prefill_tokens) / st.rounds if st.rounds else 0
            row["sd_model"] = {"E_SD": e, "T_SD": t_d / t_v, "ideal_decode_tokens_per_s": e / (t_v + t_d)}
            row["sd_model"]["measured_over_ideal"] = row["decode_tokens_per_s"] / row["sd_model"]["ideal_decode_tokens_per_s"]
        result["modes"][mode] = row
    if base is not None and hf:
        ar_tps = result["modes"]["ar"]["tokens_per_s"]
        for k, v in result["hf"].items():
            v["ours_ar_over_this"] = ar_tps / v["tokens_per_s"]
            if params.greedy:
                v["identical_to_our_ar"] = all(_same_prefix(o, b["output_ids"]) for o, b in zip(hf[k]["outputs"], base[1]))
    _print_table(result)
    js, png = save_results(ns.out, "bench", result, _plot)
    print(f"wrote {js} and {png}")
    if ns.json:
        print(json.dumps(result, default=str))
    return 0


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _print_table(r: dict) -> None:
    print()
    print(f"target: {r['target']}")
    print(f"draft:  {r['draft']}")
    print(f"threads: target {r['threads']['target']}, SSD draft process {r['threads']['draft_process']}")
    n = r.get("numerics") or {}
    if n:
        inv = n.get("invariance")
        print(f"dtype: {n['dtype']} ({n['dtype_reason']}); kernels: "
              + ("batch-invariant" + ("" if inv is None or inv["invariant"] else " (probe FAILED here)") if n["batch_invariant"] else "plain"))
    print(f"{'system':<12} {'tok/s':>8} {'vs AR':>7} {'vs plain AR':>12} {'accept':>7} {'mean len':>9} {'hit rate':>9} {'same as AR':>11}")
    for mode, row in r["modes"].items():
        print(f"{mode:<12} {row['tokens_per_s']:>8.2f} {_fmt(row.get('speedup_vs_ar')):>7} {_fmt(row.get('speedup_vs_plain_ar')):>12} "
              f"{_fmt(row['acceptance_rate']):>7} {_fmt(row['mean_accepted_length']):>9} {_fmt(row['cache_hit_rate']):>9} "
              f"{str(row.get('identical_to_ar', '-')):>11}")
    for k, v in r["hf"].items():
        print(f"{k:<12} {v['tokens_per_s']:>8.2f} {_fmt(1 / v['ours_ar_over_this'] if 'ours_ar_over_this' in v else None):>7}"
              f" {'':>12} {'':>7} {'':>9} {'':>9} {str(v.get('identical_to_our_ar', '-')):>11}")
    if "ar" in r["modes"] and r["hf"].get("hf"):
        print(f"our AR / HF generate = {r['hf']['hf']['ours_ar_over_this']:.2f}")
    ssd = r["modes"].get("ssd")
    if ssd and ssd.get("thm7"):
        t = ssd["thm7"]
        print(f"SSD Thm 7: p_hit={t['p_hit']:.2f} E_hit={t['E_hit']:.2f} E_miss={t['E_miss']:.2f} T_p={t['T_p']:.2f} "
              f"T_b={t['T_b']:.2f} -> ideal {t['ideal_decode_tokens_per_s']:.2f} tok/s (decode), measured "
              f"{ssd['decode_tokens_per_s']:.2f}; measured/ideal = {t['measured_over_ideal']:.2f}")
    c = r["forward_ms"]
    print("forward (ms, median): " + ", ".join(f"{k}={v:.3g}" for k, v in c.items()))
    sd = r["modes"].get("sd")
    if sd and sd.get("sd_model"):
        m = sd["sd_model"]
        print(f"SD model: E_SD={m['E_SD']:.2f} T_SD={m['T_SD']:.2f} -> ideal {m['ideal_decode_tokens_per_s']:.2f} tok/s, "
              f"measured/ideal = {m['measured_over_ideal']:.2f}")
    for mode, row in r["modes"].items():
        if row.get("acceptance_by_category") and any(a is not None for a in row["acceptance_by_category"].values()):
            cats = ", ".join(f"{c}={_fmt(a)}" for c, a in row["acceptance_by_category"].items())
            print(f"{mode} acceptance by category: {cats}")
    for mode, row in r["modes"].items():
        if row.get("accepted_per_pos") and row.get("num_drafts"):
            rates = " ".join(f"{a / row['num_drafts']:.2f}" for a in row["accepted_per_pos"])
            print(f"{mode} P(draft position i accepted), i = 1..{len(row['accepted_per_pos'])}: {rates}")


def _plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(r["modes"]) + list(r["hf"])
    tps = [r["modes"][m]["tokens_per_s"] for m in r["modes"]] + [r["hf"][k]["tokens_per_s"] for k in r["hf"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    bars = ax.bar(labels, tps, color=["#888", "#4a7", "#d62", "#bbb", "#57a", "#9ad", "#cde"][: len(labels)])
    ar = r["modes"].get("ar", {}).get("tokens_per_s")
    for b, v in zip(bars, tps):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}" + (f"\n{v / ar:.2f}x AR" if ar else ""), ha="center", va="bottom", fontsize=8)
    ssd = r["modes"].get("ssd")
    if ssd and ssd.get("thm7"):
        ax.axhline(ssd["thm7"]["ideal_decode_tokens_per_s"], color="#d62", ls="--", lw=1, label="SSD Thm 7 ideal (decode)")
        ax.legend(fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.set_title("throughput, same pair, same machine, batch 1")
    ax = axes[1]
    for mode, row in r["modes"].items():
        if row["accepted_per_pos"] and row["num_drafts"]:
            rates = [a / row["num_drafts"] for a in row["accepted_per_pos"]]
            ax.plot(range(1, len(rates) + 1), rates, marker="o", label=mode)
    ax.set_xlabel("draft position")
    ax.set_ylabel("P(accepted)")
    ax.set_ylim(0, 1)
    ax.set_title("acceptance by position")
    if ax.lines:
        ax.legend(fontsize=8)
    fig.suptitle(f"ssd bench - draft: {r['draft'][:80]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
