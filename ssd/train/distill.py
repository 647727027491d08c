"""`ssd train-draft`: distil a small draft from the target it will serve.

Pipeline: generated prompts -> the target's own greedy continuations (batched AR engine) ->
head vocabulary (most frequent generated tokens) -> teacher distributions (one target forward
per batch of whole sequences, top-k over the head kept) -> KL(target || draft) training of a
draft initialised from target layers -> held-out top-1 agreement (the greedy acceptance proxy)
-> the draft directory (ssd/train/draft_io.py). OUT/train_state holds data, teacher targets and
checkpoints, so --resume neither regenerates nor retrains what is done.

This module holds the two pipelines (generated prompts: `distill`; `ssd make-data` shards:
`distill_from_data`) and the command's entry point; the pieces they join are their own modules:
examples and teacher targets (ssd/train/examples.py), the loss (ssd/train/objective.py), the
training loop (ssd/train/loop.py), evaluation (ssd/train/evaluate.py), model cards and plots
(ssd/train/cards.py).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ssd.train.config import TrainDraftConfig
from ssd.train.draft_model import grow_draft
from ssd.train.cards import data_model_card, earlier_training, grown_note, model_card, plot_curves
from ssd.train.draft_io import SAVE_DTYPES
from ssd.train.evaluate import acceptance_curve
from ssd.train.examples import (Example, atomic_save, examples_from_shards, generate_continuations, select_head,
                                teacher_targets)
from ssd.train.loop import train


# ---- the whole pipeline ---------------------------------------------------------------------
def distill(cfg: TrainDraftConfig, target_path: Path, target_ref: str, train_prompts: list[list[int]],
            eval_prompts: list[list[int]], always_ids=(), data_meta: dict | None = None,
            deadline: float | None = None) -> dict:
    """Everything after tokenisation: data, head, teacher, init, training, the draft directory."""
    from ssd.models.loader import load_model
    from ssd.train.draft_io import save_draft
    from ssd.train.draft_model import draft_from_target, init_layer_ids

    t_start = time.time()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    state = out / "train_state"
    state.mkdir(parents=True, exist_ok=True)
    target, tcfg = load_model(target_path)
    prompts = train_prompts + eval_prompts
    key = {"target": str(target_path), "prompts": prompts, "gen_tokens": cfg.gen_tokens}
    outputs, gen_s = generate_continuations(target, tcfg.eos_token_ids, prompts, cfg.gen_tokens, cfg.gen_batch,
                                            state / "data.pt", key)
    gen_tokens = sum(len(o) for o in outputs)
    examples = [Example((p + o)[:cfg.seq_len], min(len(p), cfg.seq_len)) for p, o in zip(prompts, outputs)]
    train_ex, eval_ex = examples[:len(train_prompts)], examples[len(train_prompts):]
    eval_ex = [e for e in eval_ex if len(e.ids) > e.prompt_len]  # prompts longer than seq_len leave nothing

    head_ids = select_head([o for o in outputs[:len(train_prompts)]], tcfg.vocab_size, cfg.head_vocab,
                           tuple(always_ids) + tuple(tcfg.eos_token_ids))
    tkey = {"data": key, "head_ids": head_ids.tolist(), "topk": cfg.teacher_topk, "seq_len": cfg.seq_len}
    tstore = state / "teacher.pt"
    saved = torch.load(tstore, weights_only=False) if tstore.exists() else None
    if saved is not None and saved["key"] == tkey:
        for e, (tl, ti) in zip(examples, saved["targets"]):
            e.teacher_logits, e.teacher_idx = tl, ti
    else:
        teacher_targets(target, examples, head_ids, cfg.teacher_topk)
        atomic_save({"key": tkey, "targets": [(e.teacher_logits, e.teacher_idx) for e in examples]}, tstore)
    del target

    draft = draft_from_target(target_path, cfg.layers, head_ids, cfg.init_layers)
    summary = train(draft, train_ex, eval_ex, cfg, state, deadline)
    dtype = SAVE_DTYPES[cfg.save_dtype]
    save_draft(out, draft, target_path, target_ref, dtype=dtype)
    size = (out / "model.safetensors").stat().st_size
    info = {
        "target": target_ref, "layers": cfg.layers,
        "init_layers": f"{cfg.init_layers} (target layers {init_layer_ids(tcfg.num_layers, cfg.layers, cfg.init_layers)})",
        "head_vocab": int(head_ids.numel()), "train_prompts": len(train_prompts), "eval_prompts": len(eval_prompts),
        "gen_tokens_total": gen_tokens, "gen_seconds": round(gen_s, 1),
        "gen_tokens_per_s": round(gen_tokens / max(gen_s, 1e-9), 1),
        "train_tokens_per_step": None, "file_bytes": size, "save_dtype": cfg.save_dtype,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "wall_s_this_run": round(time.time() - t_start, 1), **(data_meta or {}), **summary,
    }
    info.pop("train_tokens_per_step")
    (state / "summary.json").write_text(json.dumps(info, indent=2))
    (out / "README.md").write_text(model_card(cfg, info))
    return info


def distill_from_data(cfg: TrainDraftConfig, target_path: Path, target_ref: str, always_ids=(),
                      command_line: str = "", deadline: float | None = None) -> dict:
    """Train a draft on `ssd make-data` shards (cfg.data), evaluate it on the held-out shards
    (cfg.eval_data): top-1 agreement with the target, KL, and the n-alpha acceptance curve."""
    from ssd.models.loader import read_config
    from ssd.train.data import DataDir, load_shards
    from ssd.train.draft_io import save_draft
    from ssd.train.draft_model import draft_from_target, init_layer_ids

    t_start = time.time()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    state = out / "train_state"
    state.mkdir(parents=True, exist_ok=True)
    dirs = cfg.data_dirs
    eval_dir = Path(cfg.eval_data) if cfg.eval_data else Path(dirs[0]).parent / "sharegpt-heldout"
    train_ms, eval_m = [DataDir(d).manifest() for d in dirs], DataDir(eval_dir).manifest()
    for d, m in zip((*dirs, eval_dir), (*train_ms, eval_m)):
        if m is None:
            raise FileNotFoundError(f"no `ssd make-data` output in {d}")
    if any(m["key"]["split"] != "train" for m in train_ms) or eval_m["key"]["split"] != "heldout":
        raise ValueError("--data must hold the train split and --eval-data the held-out split")
    targets = {Path(m["key"]["target"]).name for m in (*train_ms, eval_m)}
    if len(targets) > 1:  # another target's distributions would teach the draft the wrong model
        raise ValueError(f"--data and --eval-data were made with different targets: {sorted(targets)}")
    train_m = train_ms[0]
    tcfg = read_config(target_path)
    train_seqs, sources, left = [], [], cfg.data_tokens or None
    for d, m in zip(dirs, train_ms):  # --data-tokens counts across the directories, in order
        seqs = load_shards(d, left) if left is None or left > 0 else []
        n_tok = sum(len(sq["ids"]) - sq["prompt_len"] for sq in seqs)
        left = None if left is None else left - n_tok
        train_seqs += seqs
        sources.append({
            "data": str(d), "answers": m["key"].get("answers", "target"), "first_shard": m["key"].get("first_shard", 0),
            "answer_cap": m["key"].get("gen_tokens"), "shards": sorted(x["index"] for x in m["shards"]),
            "data_seed": m["key"].get("seed", 0), "train_sequences": len(seqs), "train_answer_tokens": n_tok,
            "data_tokens_per_s": m.get("tokens_per_s"), "data_dtype": m.get("dtype")})
    eval_seqs = load_shards(eval_dir)
    answers = [sq["ids"][sq["prompt_len"]:].tolist() for sq in train_seqs]
    earlier, grown_from = None, cfg.layers
    if cfg.init_from:  # more training for a draft trained before, on data this run does not hold
        from ssd.train.draft_io import load_trainable

        earlier = load_trainable(cfg.init_from, target_path)
        grown_from = earlier.cfg.num_layers
        if grown_from > cfg.layers:
            raise ValueError(f"{cfg.init_from} has {grown_from} layers, more than --layers {cfg.layers}")
        if grown_from < cfg.layers:  # deeper: new zero-output layers keep the draft's function at the start
            earlier = grow_draft(earlier, target_path, cfg.layers)
        head_ids = earlier.head_token_ids.clone()
    elif cfg.head_from:  # e.g. a draft whose head was chosen on more data than this run has
        from safetensors import safe_open

        with safe_open(str(Path(cfg.head_from) / "model.safetensors"), "pt") as f:
            head_ids = f.get_tensor("head_token_ids").long()
    else:
        head_ids = select_head(answers, tcfg.vocab_size, cfg.head_vocab, tuple(always_ids) + tuple(tcfg.eos_token_ids))
    feature = cfg.kind == "feature"
    if feature and not (train_m.get("feature_layers") and eval_m.get("feature_layers")):
        raise ValueError("--kind feature needs shards made with `ssd make-data --features` (train and held-out)")
    train_ex = examples_from_shards(train_seqs, head_ids, tcfg.vocab_size, cfg.seq_len, with_features=feature)
    eval_ex = examples_from_shards(eval_seqs, head_ids, tcfg.vocab_size, cfg.seq_len, with_features=feature)
    del train_seqs, eval_seqs
    train_tokens = sum(len(a) for a in answers)
    tqdm.write(f"data: {len(train_ex)} train sequences ({train_tokens} answer tokens), {len(eval_ex)} held-out")
    if feature:
        from ssd.train.feature_train import train_feature_draft

        return train_feature_draft(cfg, target_path, target_ref, head_ids, tuple(train_m["feature_layers"]),
                                   train_ex, eval_ex, train_tokens, train_m, eval_dir, state, command_line, t_start,
                                   deadline)
    draft = earlier or draft_from_target(target_path, cfg.layers, head_ids, cfg.init_layers)
    curve0 = acceptance_curve(draft, eval_ex, positions=cfg.curve_positions)
    summary = train(draft, train_ex, eval_ex, cfg, state, deadline)
    curve = acceptance_curve(draft, eval_ex, positions=cfg.curve_positions)
    save_draft(out, draft, target_path, target_ref, dtype=SAVE_DTYPES[cfg.save_dtype])
    info = {
        "target": target_ref, "layers": cfg.layers,
        "init_layers": (f"the draft in `{cfg.init_from}` (continued{grown_note(grown_from, cfg.layers, tcfg)})"
                        if earlier is not None else
                        f"{cfg.init_layers} (target layers {init_layer_ids(tcfg.num_layers, cfg.layers, cfg.init_layers)})"),
        "earlier_training": earlier_training(cfg.init_from) if earlier is not None else [],
        "sources": sources,
        "head_vocab": int(head_ids.numel()), "data": str(cfg.data), "eval_data": str(eval_dir),
        "train_sequences": len(train_ex), "train_answer_tokens": train_tokens, "eval_sequences": len(eval_ex),
        "acceptance_curve": curve, "acceptance_curve_init": curve0,
        "file_bytes": (out / "model.safetensors").stat().st_size, "save_dtype": cfg.save_dtype,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "wall_s_this_run": round(time.time() - t_start, 1), "command_line": command_line, **summary,
    }
    (state / "summary.json").write_text(json.dumps(info, indent=2))
    plot_curves(out / "acceptance.png", info, state / "log.jsonl")
    (out / "README.md").write_text(data_model_card(cfg, info))
    return info


def train_draft(cfg: TrainDraftConfig, command_line: str = "") -> dict:
    """`ssd train-draft`: the whole run for cfg (from `ssd make-data` shards when cfg.data is set,
    else from generated prompts); prints a summary line and returns the run's summary."""
    from collections import Counter

    from ssd.models.loader import DEFAULT_TARGET, resolve_model
    from ssd.tokenizer import Tokenizer
    from ssd.train.prompts import build_prompts, split_eval

    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    deadline = t0 + cfg.time_budget_min * 60 if cfg.time_budget_min > 0 else None
    target_path = resolve_model(cfg.target)
    tok = Tokenizer(target_path)
    always = tuple(tok.eos_token_ids) + tuple(getattr(tok._tok, "all_special_ids", ()))  # chat special tokens
    ref = DEFAULT_TARGET if cfg.target in ("default", DEFAULT_TARGET) else str(target_path.resolve())
    if cfg.data:
        info = distill_from_data(cfg, target_path, ref, always, command_line, deadline)
        c = info["acceptance_curve"]
        print(f"draft written to {cfg.out}: {info['steps']} steps on {info['train_answer_tokens']} answer tokens, "
              f"held-out agreement {info['eval']['agreement']:.3f}, n-alpha "
              + " ".join(f"{x:.2f}" for x in c["alpha"]) + f", {c['mean_accepted']:.2f} accepted per round")
        return info
    prompts = build_prompts(cfg.num_prompts, cfg.seed)
    train_p, eval_p = split_eval(prompts, cfg.eval_prompts)
    enc = lambda ps: [tok.apply_chat_template([{"role": "user", "content": p["prompt"]}]) for p in ps]
    cats = ", ".join(f"{c} {n}" for c, n in Counter(p["category"] for p in prompts).most_common())
    Path(cfg.out, "train_state").mkdir(parents=True, exist_ok=True)
    Path(cfg.out, "train_state", "prompts.jsonl").write_text(
        "".join(json.dumps({**p, "split": "eval" if p in eval_p else "train"}) + "\n" for p in prompts))
    info = distill(cfg, target_path, ref, enc(train_p), enc(eval_p), always,
                   {"categories": cats, "command_line": command_line}, deadline)
    ev = info["eval"]
    print(f"draft written to {cfg.out}: {info['steps']} steps, held-out agreement {ev['agreement']:.3f} "
          f"(init {info['eval_step0']['agreement'] if info.get('eval_step0') else float('nan'):.3f}), "
          f"head coverage {ev['head_coverage']:.3f}, {info['file_bytes'] / 1e6:.1f} MB; "
          f"generation {info['gen_tokens_per_s']} tok/s, training {info['steps_per_s']:.2f} steps/s")
    return info
