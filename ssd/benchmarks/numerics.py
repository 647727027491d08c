"""`ssd bench --numerics`: what the dtype and the batch-invariant kernels cost, in one run.

For fp32 and bf16, each with the batch-invariant kernels and with the plain ones (SDPA, F.linear):
- the target's forward latency for 1, 2, 3, 5, 8, 16 new tokens after a 300-token context
  (median), and verify(K+1) / AR step;
- AR decoding tokens/s on the same prompts;
- Hugging Face `generate` in the same dtype on the same prompts;
then the ratios a reader asks for: bf16 AR over fp32 AR, our AR over HF, the invariant path over
the plain one. Writes numerics.json and numerics.png. Ratios, not times: the machine is shared.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import EngineConfig, SamplingParams
from . import BenchOptions, save_results

TOKENS_IN_FORWARD = (1, 2, 3, 5, 8, 16)


def forward_table(model, context: int = 300, repeats: int = 11) -> dict[int, float]:
    from ..kv_cache import append_batch

    g = torch.Generator().manual_seed(0)
    cache = model.new_cache(1, context + max(TOKENS_IN_FORWARD) + 1)
    model(torch.randint(0, 8000, (1, context), generator=g), append_batch([0], [0], context), cache)
    out = {}
    for n in TOKENS_IN_FORWARD:
        ts = []
        for _ in range(repeats):
            x = torch.randint(0, 8000, (1, n), generator=g)
            t0 = time.perf_counter()
            model(x, append_batch([0], [context], n), cache, logits_rows=torch.arange(n)[None])
            ts.append(time.perf_counter() - t0)
        out[n] = 1000 * sorted(ts)[len(ts) // 2]
    return out


def _ar_tps(cfg: EngineConfig, model, eos, prompt_ids, params) -> tuple[float, list[list[int]]]:
    from ..engine import AREngine

    eng = AREngine(cfg.replace(mode="ar"), model, eos)
    eng.generate([prompt_ids[0]], SamplingParams(max_tokens=4))  # warm-up (packs the weights)
    tokens, wall, outs = 0, 0.0, []
    for ids in prompt_ids:
        t0 = time.perf_counter()
        seq = eng.generate([ids], params)[0]
        wall += time.perf_counter() - t0
        tokens += len(seq.output_ids)
        outs.append(seq.output_ids)
    return tokens / wall, outs


def _hf_tps(path: str, dtype, eos, prompt_ids, params) -> tuple[float, list[list[int]]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    kw = dict(max_new_tokens=params.max_tokens, eos_token_id=list(eos), pad_token_id=eos[0], do_sample=False)
    x0 = torch.tensor([prompt_ids[0]])
    hf.generate(x0, attention_mask=torch.ones_like(x0), **{**kw, "max_new_tokens": 4})
    tokens, wall, outs = 0, 0.0, []
    for ids in prompt_ids:
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            y = hf.generate(x, attention_mask=torch.ones_like(x), **kw)
        wall += time.perf_counter() - t0
        new = y[0, x.shape[1]:].tolist()
        tokens += len(new)
        outs.append(new)
    return tokens / wall, outs


def run_numerics(cfg: EngineConfig, params: SamplingParams, opts: BenchOptions) -> int:
    from .engines import load_prompts
    from ..models.invariance import self_check
    from ..models.loader import load_model, resolve_model
    from ..models.precision import cpu_has_native_bf16
    from ..tokenizer import Tokenizer

    torch.set_num_threads(cfg.target_threads)
    path = resolve_model(cfg.target)
    tok = Tokenizer(path)
    prompts = load_prompts(opts.prompts, opts.num_prompts)
    prompt_ids = [tok.apply_chat_template([{"role": "user", "content": p["prompt"]}]) for p in prompts]
    greedy = SamplingParams(max_tokens=params.max_tokens)
    k = cfg.speculation.num_speculative_tokens
    result = {"command": opts.command_line, "target": str(path), "threads": cfg.target_threads,
              "native_bf16": cpu_has_native_bf16(), "num_prompts": len(prompts), "max_tokens": params.max_tokens,
              "k": k, "configs": {}, "hf": {}}
    bar = tqdm(total=2 * 3, desc="numerics")
    # the envelope: verify rows (max_batch x (K+1)) and the draft's tree rows (max_batch x fan-out
    # budget), contexts up to max_model_len, at 1, 2 and all threads
    rows = max(cfg.max_batch * (k + 1), cfg.max_batch * cfg.speculation.fan_out_budget)
    result["envelope"] = {"rows": rows, "max_len": cfg.max_model_len, "probes": {}}
    for dname in ("float32", "bfloat16"):
        dtype = getattr(torch, dname)
        model, _ = load_model(path, dtype=dtype)
        for threads in sorted({1, 2, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            result["envelope"]["probes"][f"{dname}/{threads} threads"] = self_check(model, rows, cfg.max_model_len)["failures"]
        torch.set_num_threads(cfg.target_threads)
        for inv in (True, False):
            model.invariant = inv
            model.packs.clear()
            label = f"{dname}/{'invariant' if inv else 'plain'}"
            bar.set_postfix_str(label)
            fwd = forward_table(model)
            tps, outs = _ar_tps(cfg.replace(dtype=dname, batch_invariant=inv), model, tok.eos_token_ids, prompt_ids, greedy)
            result["configs"][label] = {"forward_ms": fwd, "verify_over_ar_step": fwd[k + 1] / fwd[1],
                                        "ar_tokens_per_s": tps, "outputs": outs}
            bar.update()
        del model
        bar.set_postfix_str(f"{dname}/hf")
        tps, outs = _hf_tps(str(path), dtype, tok.eos_token_ids, prompt_ids, greedy)
        result["hf"][dname] = {"tokens_per_s": tps, "outputs": outs}
        bar.update()
    bar.close()
    _ratios(result)
    _print(result)
    js, png = save_results(opts.out, "numerics", result, _plot)
    print(f"wrote {js} and {png}")
    return 0


def _ratios(r: dict) -> None:
    c, hf = r["configs"], r["hf"]
    ar = lambda label: c[label]["ar_tokens_per_s"]
    r["ratios"] = {
        "ar_bf16_over_fp32_invariant": ar("bfloat16/invariant") / ar("float32/invariant"),
        "ar_bf16_over_fp32_plain": ar("bfloat16/plain") / ar("float32/plain"),
        "our_ar_over_hf_bf16_invariant": ar("bfloat16/invariant") / hf["bfloat16"]["tokens_per_s"],
        "our_ar_over_hf_bf16_plain": ar("bfloat16/plain") / hf["bfloat16"]["tokens_per_s"],
        "our_ar_over_hf_fp32_invariant": ar("float32/invariant") / hf["float32"]["tokens_per_s"],
        "our_ar_over_hf_fp32_plain": ar("float32/plain") / hf["float32"]["tokens_per_s"],
        "invariant_over_plain_ar_fp32": ar("float32/invariant") / ar("float32/plain"),
        "invariant_over_plain_ar_bf16": ar("bfloat16/invariant") / ar("bfloat16/plain"),
    }
    # exactness side by side: the plain and invariant kernels of one dtype may pick different
    # near-tie tokens; report how far they agree
    for d in ("float32", "bfloat16"):
        a, b = c[f"{d}/invariant"]["outputs"], c[f"{d}/plain"]["outputs"]
        r["ratios"][f"prompts_where_plain_equals_invariant_{d}"] = sum(x == y for x, y in zip(a, b)) / len(a)


def _print(r: dict) -> None:
    print()
    print(f"target {r['target']}, {r['threads']} thread(s), native bf16 on this CPU: {r['native_bf16']}")
    head = "".join(f"{n:>8}" for n in TOKENS_IN_FORWARD)
    print(f"{'forward ms (tokens ->)':<24}{head}  verify/AR   AR tok/s")
    for label, row in r["configs"].items():
        cells = "".join(f"{row['forward_ms'][n]:>8.1f}" for n in TOKENS_IN_FORWARD)
        print(f"{label:<24}{cells}  {row['verify_over_ar_step']:>8.2f}  {row['ar_tokens_per_s']:>9.2f}")
    for d, row in r["hf"].items():
        print(f"{'HF generate ' + d:<24}{'':>{8 * len(TOKENS_IN_FORWARD)}}  {'':>8}  {row['tokens_per_s']:>9.2f}")
    for k, v in r["ratios"].items():
        print(f"  {k} = {v:.2f}")
    env = r["envelope"]
    for label, failures in env["probes"].items():
        print(f"envelope {label} (rows <= {env['rows']}, context <= {env['max_len']}): "
              + ("invariant" if not failures else "NOT invariant: " + "; ".join(failures[:2])))


def _plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"float32/invariant": "#26a", "float32/plain": "#8ad", "bfloat16/invariant": "#2a6",
              "bfloat16/plain": "#8c8", "HF float32": "#777", "HF bfloat16": "#bbb"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for label, row in r["configs"].items():
        ax.plot(TOKENS_IN_FORWARD, [row["forward_ms"][n] for n in TOKENS_IN_FORWARD], marker="o", label=label,
                ls="-" if "invariant" in label else "--", color=colors[label])
    ax.set_xlabel("tokens in one forward (300-token context)")
    ax.set_ylabel("ms (median)")
    ax.set_title("target forward cost")
    ax.legend(fontsize=8)
    ax = axes[1]
    labels = list(r["configs"]) + [f"HF {d}" for d in r["hf"]]
    vals = [row["ar_tokens_per_s"] for row in r["configs"].values()] + [row["tokens_per_s"] for row in r["hf"].values()]
    ax.bar(range(len(labels)), vals, color=[colors[x] for x in labels])
    ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("AR tokens / s")
    ax.set_title("AR decoding, batch 1")
    fig.suptitle(f"ssd bench --numerics ({r['threads']} thread(s), native bf16: {r['native_bf16']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
