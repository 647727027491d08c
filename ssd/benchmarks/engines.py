"""`ssd bench`: AR vs SD vs SSD on the same model pair, prompts and machine, in one run.

Ratios, never absolute times, are the result (the machine is shared and noisy). The baselines,
all in the same run: AR on the target's thread budget, AR on the plain (non-invariant) kernels,
and AR on every core of the machine (SSD's draft process takes a core the target does not use, so
that is the fair one for SSD); Hugging Face transformers `generate` and assisted generation on
the same weights in the engines' dtype, on the target's threads, and `generate` on every core.
Every system's tokens/s over each baseline's is reported side by side (row["vs"]).
The paper's Thm 7 ideal is computed from what SSD measured (p_hit, E_hit, E_miss, T_p, T_b, the
verify-pass time) and compared with the measured speed: measured/ideal = 1 - engine overhead.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import EngineConfig, SamplingParams
from . import BenchOptions, paired_ratio, repeat_error_bars, save_results
from ..engine import ModelPair, build_engine
from ..engine.base import EngineStats
from ..models.quantized import weight_bytes_per_token
from .llamacpp import LlamaCppReference, agreeing_prefix, available, gguf_of


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
    # the physical floor of one token: the weight bytes a forward reads over this thread's
    # measured read bandwidth (what no kernel can beat at batch 1)
    out["weights_mb_per_token"] = weight_bytes_per_token(pair.target) / 2**20
    out["read_gb_per_s"] = read_bandwidth_gbs()
    out["floor_ms"] = weight_bytes_per_token(pair.target) / (out["read_gb_per_s"] * 1e9) * 1000
    out["target_1_over_floor"] = out["target_1"] / out["floor_ms"]
    return out


def read_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    """This thread's read bandwidth (GB/s): the median time to sum an fp32 tensor of `mb` MB,
    far larger than any cache."""
    x = torch.ones(mb * 2**20 // 4)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t0)
    return x.numel() * 4 / sorted(ts)[len(ts) // 2] / 1e9


def decode_tps(st: EngineStats) -> float:
    """Tokens/s after the first token (prefill and its token excluded): what Thm 7 models."""
    t = st.wall - st.t_prefill
    return (st.tokens - st.prefill_tokens) / t if t > 0 else 0.0


def run_engine(cfg, pair, prompt_ids, params, label):
    with build_engine(cfg, pair) as eng:
        eng.generate([prompt_ids[0]], SamplingParams(max_tokens=8, temperature=params.temperature, seed=0))  # warm-up
        total = EngineStats()
        per_prompt = []
        for ids in tqdm(prompt_ids, desc=f"{label:>4}", leave=False):
            eng.stats = EngineStats()
            seq = eng.generate([ids], params)[0]
            per_prompt.append({"output_ids": seq.output_ids, "stats": eng.stats})
            accumulate_stats(total, eng.stats)
    return total, per_prompt


def accumulate_stats(total: EngineStats, st: EngineStats) -> None:
    for k, v in vars(st).items():
        if isinstance(v, (int, float)):
            setattr(total, k, getattr(total, k) + v)
        elif k == "accepted_per_pos":
            while len(total.accepted_per_pos) < len(v):
                total.accepted_per_pos.append(0)
            for i, x in enumerate(v):
                total.accepted_per_pos[i] += x


class HFReferences:
    """transformers `generate` and assisted generation (same draft, same K) in our engines' dtype
    on `threads` torch threads, and `generate` again on every core (`all_cores` threads). The
    models are loaded once; `run` makes one timed pass of each over the prompts."""

    def __init__(self, pair: ModelPair, prompt_ids, params, k: int, threads: int, all_cores: int):
        from transformers import AutoModelForCausalLM

        self.dtype = getattr(torch, pair.numerics.get("dtype", "float32"))  # the same dtype as our engines
        self.target = AutoModelForCausalLM.from_pretrained(pair.target_path, dtype=self.dtype).eval()
        assistant = _hf_assistant(pair).to(self.dtype)
        assistant.generation_config.num_assistant_tokens = k
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        assistant.generation_config.assistant_confidence_threshold = 0.0
        eos = list(pair.tokenizer.eos_token_ids)
        self.kw = dict(max_new_tokens=params.max_tokens, eos_token_id=eos, pad_token_id=eos[0])
        if params.greedy:
            self.kw["do_sample"] = False
        else:
            self.kw.update(do_sample=True, temperature=params.temperature, top_k=params.top_k or None, top_p=params.top_p)
        self.prompt_ids, self.threads, self.all_cores = prompt_ids, threads, all_cores
        self.systems = [("hf", {}, threads), ("hf_assisted", {"assistant_model": assistant}, threads)]
        if all_cores != threads:
            self.systems.append(("hf-all", {}, all_cores))

    def run(self, first: bool) -> dict:
        """One pass of each system -> {label: result}. On the first call each system is warmed up,
        and one on a thread count other than the target's makes one untimed pass first (see
        run_bench)."""
        out = {}
        for label, extra, n_threads in self.systems:
            torch.set_num_threads(n_threads)
            load = os.getloadavg()[0]
            passes = []
            if first:
                ids0 = torch.tensor([self.prompt_ids[0]])
                self.target.generate(ids0, attention_mask=torch.ones_like(ids0), **{**self.kw, "max_new_tokens": 8},
                                     **extra)  # warm-up
                if n_threads != self.threads:
                    passes.append(_hf_pass(self.target, self.prompt_ids, self.kw, extra, label + " (untimed)"))
            tokens, wall, outs = _hf_pass(self.target, self.prompt_ids, self.kw, extra, label)
            dtype = str(next(self.target.parameters()).dtype).removeprefix("torch.")
            out[label] = {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "outputs": outs,
                          "threads": torch.get_num_threads(), "load_avg_1m_at_start": load, "dtype": dtype,
                          "label": _label(label, torch.get_num_threads(), self.all_cores, str(self.dtype).removeprefix("torch."))}
            if passes:
                out[label]["first_pass_tokens_per_s"] = passes[0][0] / passes[0][1]
            print(f"{out[label]['label']}: {tokens / wall:7.2f} tok/s", flush=True)
        torch.set_num_threads(self.threads)
        return out


def _hf_pass(target, prompt_ids, kw, extra, label) -> tuple[int, float, list]:
    """transformers generate over every prompt: (new tokens, seconds, outputs)."""
    tokens, wall, outs = 0, 0.0, []
    for ids in tqdm(prompt_ids, desc=f"{label:>4}", leave=False):
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            y = target.generate(x, attention_mask=torch.ones_like(x), **kw, **extra)
        wall += time.perf_counter() - t0
        new = y[0, x.shape[1]:].tolist()
        tokens += len(new)
        outs.append(new)
    return tokens, wall, outs


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
        from ..models.loader import read_tensor

        if not is_draft_dir(d_desc.path):
            return AutoModelForCausalLM.from_pretrained(d_desc.path, dtype=torch.float32).eval()
        d = json.loads((Path(d_desc.path) / "config.json").read_text())
        d.pop("ssd_draft")
        m = LlamaForCausalLM(LlamaConfig(**d)).float().eval()
        own = {k: v.float() for k, v in load_file(str(Path(d_desc.path) / WEIGHTS)).items()}
        head_ids = own.pop("head_token_ids").long()
        head = own.pop("lm_head.weight")
        with torch.no_grad():
            # the draft shares the target's embedding as the checkpoint holds it (dense), whatever
            # weights the loaded target runs with
            m.model.embed_tokens.weight.copy_(read_tensor(pair.target_path, "model.embed_tokens.weight"))
            m.lm_head.weight.zero_()
            m.lm_head.weight[head_ids] = head
        m.load_state_dict(own, strict=False)
    if head_ids is not None:
        # a reduced-vocabulary head: transformers needs full-vocabulary logits, so mask the rest
        mask = torch.ones(m.config.vocab_size, dtype=torch.bool)
        mask[head_ids] = False
        m.lm_head.register_forward_hook(lambda mod, inp, out: out.masked_fill(mask, float("-inf")))
    return m


AR_SYSTEMS = ("ar", "ar-plain", "ar-all")
ALL_CORES_SYSTEMS = ("ar-all", "sd-all")  # the target's threads raised to every core
# the systems every other one is compared with, and their column headers
BASELINES = {"ar": "vs AR", "ar-all": "vs AR all", "ar-plain": "vs AR plain", "hf": "vs HF", "hf-all": "vs HF all",
             "llama.cpp": "vs llama.cpp", "llama.cpp-all": "vs l.cpp all"}


def _systems(r: dict) -> dict:
    """Every row of a bench result: our engines, then the references (Hugging Face, llama.cpp)."""
    return {**r["modes"], **r["hf"], **r.get("llama_cpp", {})}


def _threads(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def _label(name: str, threads: int, all_cores: int, dtype: str = "", draft_threads: int = 0, spec=None) -> str:
    """What a system is, with the threads it ran on (all cores named as such) and, for SD and
    SSD, adaptive speculation when it is on (spec: the SpeculationConfig)."""
    t = f"all {all_cores} cores" if threads == all_cores and threads > 1 else _threads(threads)
    how = f", adaptive K ≤ {spec.num_speculative_tokens}" if spec is not None and spec.adaptive else ""
    return {
        "ar": f"AR ({t})",
        "ar-plain": f"AR, plain kernels ({t})",
        "ar-all": f"AR ({t})",
        "sd": f"SD ({t}, draft in-process{how})",
        "sd-all": f"SD ({t}, draft in-process{how})",
        "ssd": f"SSD ({t} + draft process {_threads(draft_threads)}{how})",
        "hf": f"HF generate ({dtype}, {t})",
        "hf-all": f"HF generate ({dtype}, {t})",
        "hf_assisted": f"HF assisted ({dtype}, {t})",
        "llama.cpp": f"llama.cpp (same GGUF, {t})",
        "llama.cpp-all": f"llama.cpp (same GGUF, {t})",
    }[name]


def _add_ratios(r: dict) -> None:
    """Every system's tokens/s over each baseline's that ran (row["vs"][baseline]). With several
    repeats the ratio is taken within each repeat (both systems ran in the same stretch of machine
    time) and row["vs"] holds the median, row["vs_range"] the lowest and highest."""
    systems = _systems(r)

    def per_repeat(row):
        return row.get("tokens_per_s_repeats") or [row["tokens_per_s"]]

    bases = {b: per_repeat(systems[b]) for b in BASELINES if b in systems}
    for row in systems.values():
        row["vs"], row["vs_range"] = {}, {}
        for b, base in bases.items():
            row["vs"][b], row["vs_range"][b] = paired_ratio(per_repeat(row), base, row.get("label"))
        for b, key in (("ar", "speedup_vs_ar"), ("ar-all", "speedup_vs_ar_all"), ("ar-plain", "speedup_vs_plain_ar")):
            if b in bases:
                row[key] = row["vs"][b]


def _hf_row(reps: list[dict]) -> dict:
    """One Hugging Face system's repeats -> its result row (median tokens/s, outputs left out)."""
    row = {k: v for k, v in reps[0].items() if k != "outputs"}
    row["tokens"] = sum(x["tokens"] for x in reps)
    row["wall_s"] = sum(x["wall_s"] for x in reps)
    row["tokens_per_s_repeats"] = [x["tokens_per_s"] for x in reps]
    row["tokens_per_s"] = statistics.median(row["tokens_per_s_repeats"])
    if len(reps) > 1:
        row["load_avg_1m_per_repeat"] = [x["load_avg_1m_at_start"] for x in reps]
    return row


def _same_prefix(a: list[int], b: list[int]) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def run_bench(cfg: EngineConfig, params: SamplingParams, opts: BenchOptions) -> int:
    prompts = load_prompts(opts.prompts, opts.num_prompts)
    modes = [m.strip() for m in opts.modes.split(",") if m.strip()]
    pair = ModelPair.load(cfg.replace(mode="ar"))
    tok = pair.tokenizer
    prompt_ids = [tok.apply_chat_template([{"role": "user", "content": p["prompt"]}]) for p in prompts]
    torch.set_num_threads(cfg.target_threads)
    costs = forward_costs(pair, cfg.speculation.num_speculative_tokens)
    all_cores = os.cpu_count() or 1
    repeats = opts.repeats
    # (name, config, whether its first pass is untimed): every system of the run, in the order
    # each repeat runs them
    plan = [(mode, cfg.replace(mode=mode), False) for mode in modes]
    if "ar" in modes and cfg.batch_invariant:
        # the fastest single-token kernels: AR on the plain (non-invariant) kernels
        plan.append(("ar-plain", cfg.replace(mode="ar", batch_invariant=False), False))
    if "ar" in modes and all_cores != cfg.target_threads:
        # the baseline a skeptic picks: SSD's draft process takes cores the target does not use,
        # so plain decoding may have them all. A thread count this process has not used yet: its
        # first pass over the prompts is untimed (one-off costs of the new thread count; reported
        # as first_pass_tokens_per_s).
        plan.append(("ar-all", cfg.replace(mode="ar", target_threads=all_cores), True))
    if "sd" in modes and all_cores != cfg.target_threads:
        # SD is sequential, so it can give every core to whichever model runs: the fair rival to
        # SSD, whose draft process holds cores of its own
        plan.append(("sd-all", cfg.replace(mode="sd", target_threads=all_cores), True))
    hf_refs = None if opts.no_hf else HFReferences(pair, prompt_ids, params, cfg.speculation.num_speculative_tokens,
                                                 cfg.target_threads, all_cores)
    lcpp, lcpp_skipped = _llama_cpp(cfg, pair, prompt_ids, params, all_cores, opts)

    runs = {name: [] for name, _, _ in plan}  # name -> [(stats, per-prompt results)] one per repeat
    hf_runs, lcpp_runs = {}, {}  # label -> [result] one per repeat
    load = {name: [] for name, _, _ in plan}  # 1-minute load average as each system started, per repeat
    first_pass = {}

    # Each repeat runs every system once, in turn, so a stretch of slow machine time (other
    # processes on the cores) hits all systems of that repeat alike; ratios are taken within a
    # repeat and their median reported (_add_ratios).
    for rep in range(repeats):
        if repeats > 1:
            print(f"repeat {rep + 1}/{repeats}", flush=True)
        for name, c, untimed in plan:
            load[name].append(os.getloadavg()[0])
            if untimed and rep == 0:
                total, _ = run_engine(c, pair, prompt_ids, params, name + " (untimed)")
                first_pass[name] = total.tokens / total.wall
            total, per = run_engine(c, pair, prompt_ids, params, name)
            runs[name].append((total, per))
            print(f"{_label(name, c.target_threads, all_cores, draft_threads=c.draft_threads, spec=c.speculation)}: "
                  f"{total.tokens / total.wall:7.2f} tok/s  ({total.tokens} tokens, {total.wall:.1f} s)", flush=True)
        torch.set_num_threads(cfg.target_threads)
        if hf_refs is not None:
            for label, res in hf_refs.run(first=rep == 0).items():
                hf_runs.setdefault(label, []).append(res)
        if lcpp is not None:
            for label, res in lcpp.run(first=rep == 0).items():
                lcpp_runs.setdefault(label, []).append(res)

    if lcpp is not None:
        lcpp.close()
        if lcpp.failed:  # rows of some repeats only would not pair with the others: none at all
            lcpp_runs, lcpp_skipped = {}, lcpp.failed
    base = runs.get("ar")  # [(stats, per-prompt results)] per repeat
    result = {
        "command": opts.command_line,
        "target": pair.target_path,
        "draft": pair.draft_desc.describe(),
        "params": vars(params),
        "engine": {k: v for k, v in vars(cfg).items() if k != "speculation"},
        "speculation": vars(cfg.speculation),
        "numerics": pair.numerics,
        "threads": {"target": cfg.target_threads, "draft_process": cfg.draft_threads, "all_cores": all_cores},
        "num_prompts": len(prompts),
        "forward_ms": costs,
        "repeats": repeats,
        "modes": {},
        "hf": {k: _hf_row(v) for k, v in hf_runs.items()},
        "llama_cpp": {k: _hf_row(v) for k, v in lcpp_runs.items()},
        "llama_cpp_skipped": lcpp_skipped,
    }
    for mode, reps in runs.items():
        st = EngineStats()
        for total, _ in reps:
            accumulate_stats(st, total)
        per = reps[0][1]
        row = st.summary()  # counts and rates pooled over the repeats
        row["tokens_per_s_repeats"] = [t.tokens / t.wall for t, _ in reps]
        row["tokens_per_s"] = statistics.median(row["tokens_per_s_repeats"])
        c = cfg.replace(target_threads=all_cores) if mode in ALL_CORES_SYSTEMS else cfg
        row["label"] = _label(mode, c.target_threads, all_cores, draft_threads=cfg.draft_threads, spec=cfg.speculation)
        row["threads"] = c.target_threads + (cfg.draft_threads if mode == "ssd" else 0)
        row["decode_tokens_per_s"] = decode_tps(st)
        row["load_avg_1m_at_start"] = load[mode][0]
        if repeats > 1:
            row["load_avg_1m_per_repeat"] = load[mode]
        if mode in first_pass:
            row["first_pass_tokens_per_s"] = first_pass[mode]
        if base is not None and params.greedy:
            # every repeat's outputs against AR's first: greedy decoding is deterministic run to run
            row["identical_to_ar"] = all(p["output_ids"] == b["output_ids"]
                                         for _, pr in reps for p, b in zip(pr, base[0][1]))
        cats = {}
        for p, q in zip(prompts, per):
            c = cats.setdefault(p["category"], [0, 0])
            c[0] += q["stats"].num_accepted_tokens
            c[1] += q["stats"].num_draft_tokens
        if mode not in AR_SYSTEMS:
            row["acceptance_by_category"] = {c: (a / d if d else None) for c, (a, d) in cats.items()}
        if mode == "ssd":
            ideal = thm7_ideal(st)
            if ideal:
                ideal["measured_over_ideal"] = row["decode_tokens_per_s"] / ideal["ideal_decode_tokens_per_s"]
            row["thm7"] = ideal
        if mode in ("sd", "sd-all") and st.steps:
            t_v, t_d = st.t_verify / st.steps, st.t_draft / st.steps
            e = (st.tokens - st.prefill_tokens) / st.rounds if st.rounds else 0
            row["sd_model"] = {"E_SD": e, "T_SD": t_d / t_v, "ideal_decode_tokens_per_s": e / (t_v + t_d)}
            row["sd_model"]["measured_over_ideal"] = row["decode_tokens_per_s"] / row["sd_model"]["ideal_decode_tokens_per_s"]
        result["modes"][mode] = row
    if base is not None and params.greedy:
        for k, v in result["hf"].items():
            v["identical_to_our_ar"] = all(_same_prefix(o, b["output_ids"])
                                           for r in hf_runs[k] for o, b in zip(r["outputs"], base[0][1]))
        for k, v in result["llama_cpp"].items():  # its own 4-bit arithmetic: agreement, not identity
            v["tokens_agreeing_with_our_ar"] = agreeing_prefix(lcpp_runs[k][0]["outputs"], [b["output_ids"] for b in base[0][1]])
    _add_ratios(result)
    _print_table(result)
    js, png = save_results(opts.out, "bench", result, _plot)
    print(f"wrote {js} and {png}")
    if opts.json:
        print(json.dumps(result, default=str))
    return 0


def _llama_cpp(cfg, pair, prompt_ids, params, all_cores, opts):
    """llama.cpp on the target's GGUF file (ssd/benchmarks/llamacpp.py) -> (reference, None) or
    (None, why it does not run)."""
    if opts.no_llama_cpp:
        return None, "--no-llama-cpp"
    why = available()
    gguf = None
    if not why:
        gguf, why = gguf_of(cfg.target, pair.target_path)
    if why:
        print(f"llama.cpp reference skipped: {why}", flush=True)
        return None, why
    return LlamaCppReference(gguf, prompt_ids, params, pair.tokenizer.eos_token_ids, cfg.target_threads, all_cores,
                             lambda name, n: _label(name, n, all_cores)), None


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _print_table(r: dict) -> None:
    print()
    print(f"target: {r['target']}")
    print(f"draft:  {r['draft']}")
    th = r["threads"]
    print(f"threads: target {th['target']}, SSD draft process {th['draft_process']}; this machine has {th['all_cores']} cores")
    n = r.get("numerics") or {}
    if n:
        inv = n.get("invariance")
        print(f"dtype: {n['dtype']} ({n['dtype_reason']}); kernels: "
              + ("batch-invariant" + ("" if inv is None or inv["invariant"] else " (probe FAILED here)") if n["batch_invariant"] else "plain"))
    systems = _systems(r)
    bases = [b for b in BASELINES if b in systems]
    print("baselines: " + "; ".join(f"{BASELINES[b].removeprefix('vs ')} = {systems[b]['label']}" for b in bases))
    for name, row in systems.items():
        if "first_pass_tokens_per_s" in row:
            print(f"{row['label']}: its first, untimed pass over the prompts ran at {row['first_pass_tokens_per_s']:.2f} tok/s")
    print("1-minute load average as each system started: "
          + ", ".join(f"{name} {row['load_avg_1m_at_start']:.1f}" for name, row in systems.items()))
    width = max(len(row["label"]) for row in systems.values())
    print(f"{'system':<{width}} {'tok/s':>8} " + " ".join(f"{BASELINES[b]:>11}" for b in bases)
          + f" {'accept':>7} {'mean len':>9} {'hit rate':>9} {'same as AR':>11}")
    for name, row in systems.items():
        spec = name in r["modes"]
        print(f"{row['label']:<{width}} {row['tokens_per_s']:>8.2f} " + " ".join(f"{row['vs'][b]:>11.2f}" for b in bases)
              + f" {_fmt(row['acceptance_rate'] if spec else None):>7} {_fmt(row['mean_accepted_length'] if spec else None):>9}"
              f" {_fmt(row['cache_hit_rate'] if spec else None):>9}"
              f" {str(row.get('identical_to_ar', row.get('identical_to_our_ar', '-'))):>11}")
    if r.get("repeats", 1) > 1:
        print(f"over {r['repeats']} repeats (each repeat runs every system once, in turn): tok/s is the median; each "
              "ratio is the median of the ratios within a repeat, [lowest, highest] over the repeats:")
        for name, row in systems.items():
            spread = "; ".join(f"{BASELINES[b]} {row['vs'][b]:.2f} [{row['vs_range'][b][0]:.2f}, {row['vs_range'][b][1]:.2f}]"
                               for b in bases if b in ("ar", "ar-all"))
            reps = ", ".join(f"{x:.1f}" for x in row["tokens_per_s_repeats"])
            print(f"  {row['label']:<{width}}  tok/s {reps}  |  {spread}")
    if "ar" in r["modes"] and r["hf"].get("hf"):
        print(f"our AR / HF generate (same threads, same dtype) = {r['modes']['ar']['vs']['hf']:.2f}")
    for name, row in r.get("llama_cpp", {}).items():
        if "tokens_agreeing_with_our_ar" in row:
            print(f"{row['label']}: its greedy output agrees with our AR for {row['tokens_agreeing_with_our_ar']:.1f} "
                  "leading tokens per prompt on average (its own 4-bit arithmetic)")
    if r.get("llama_cpp_skipped"):
        print(f"llama.cpp reference skipped: {r['llama_cpp_skipped']}")
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

    systems = _systems(r)
    labels = [row["label"] for row in systems.values()]
    tps = [row["tokens_per_s"] for row in systems.values()]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.6, 1]})
    ax = axes[0]
    colors = {"ar": "#888", "sd": "#4a7", "sd-all": "#285", "ssd": "#d62", "ar-plain": "#bbb", "ar-all": "#555",
              "hf": "#57a", "hf_assisted": "#9ad", "hf-all": "#246", "llama.cpp": "#a5c", "llama.cpp-all": "#738"}
    # with repeats, each bar spans its lowest to highest repeat (the bar itself is the median)
    reps = [row.get("tokens_per_s_repeats") or [row["tokens_per_s"]] for row in systems.values()]
    bars = ax.bar(range(len(labels)), tps, color=[colors[k] for k in systems], yerr=repeat_error_bars(tps, reps),
                  capsize=3)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    # each bar's ratio over AR on the target's threads and over AR on every core
    refs = [(b, BASELINES[b].removeprefix("vs ")) for b in ("ar", "ar-all") if b in systems]
    for bar, row, x in zip(bars, systems.values(), reps):
        note = "".join(f"\n{row['vs'][b]:.2f}x {name}" for b, name in refs)
        ax.text(bar.get_x() + bar.get_width() / 2, max(x), f"{row['tokens_per_s']:.1f}{note}",
                ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, max(max(x) for x in reps) * 1.3)
    ssd = r["modes"].get("ssd")
    if ssd and ssd.get("thm7"):
        ax.axhline(ssd["thm7"]["ideal_decode_tokens_per_s"], color="#d62", ls="--", lw=1, label="SSD Thm 7 ideal (decode)")
        ax.legend(fontsize=8)
    ax.set_ylabel("tokens / s")
    n = r.get("repeats", 1)
    ax.set_title("throughput, same pair, same machine, batch 1"
                 + (f"\nmedian of {n} repeats (bars: lowest to highest)" if n > 1 else ""), fontsize=10)
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
