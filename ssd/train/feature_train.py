"""Training the feature drafter (ssd/models/feature_draft.py) with training-time test.

At inference most of the drafter's positions are self-fed: in SD every drafted token after the
first reads the drafter's own output h instead of the target's feature, and in SSD the whole
speculation being verified is self-fed too, so round r+1's first proposal already sits K+1
self-fed positions deep. Training only on true features would teach a model that falls apart
exactly where it is used. Training-time test (EAGLE-3) unrolls it: step 0 runs the drafter on
the true features; step j feeds, at every position p, the drafter's step j-1 output at p-1, and
attends the way inference would at depth j: to true-fed keys up to p-j and to the one key of
each earlier step on its own chain (positions p-j+1 .. p, steps 1 .. j-1). Each step is trained
against the target's distribution at the same position, weighted `ttt_decay ** j`.

The tokens stay the true ones (teacher forcing): a self-fed position only matters while every
proposal before it was accepted, and then its tokens are the target's.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ssd.kv_cache import append_batch
from ssd.models.feature_draft import FeatureDraft, feature_config, target_embed_and_head
from ssd.models.llama import ModelConfig
from ssd.train.examples import Example, collate
from ssd.train.objective import distill_loss


def feature_draft_from_target(target_path, feature_layers: tuple[int, ...], head_ids: torch.Tensor,
                              init_layer: int, seed: int = 0) -> FeatureDraft:
    """A fresh drafter: the decoder layer and final norm copied from target layer `init_layer`
    and the target's final norm, fc and in_proj random (std 1/sqrt(fan-in)), input norms 1."""
    from ssd.models.loader import read_config, read_tensors, our_state_dict

    tcfg = read_config(target_path)
    d = feature_config(json.loads((Path(target_path) / "config.json").read_text()))
    cfg = ModelConfig.from_hf(d)
    cfg = ModelConfig(**{**cfg.__dict__, "eos_token_ids": tcfg.eos_token_ids})
    model = FeatureDraft(cfg, feature_layers, head_ids)
    hf = {name.replace(f"model.layers.{init_layer}.", "model.layers.0.", 1): t.float()
          for name, t in read_tensors(target_path, lambda n: n.startswith(f"model.layers.{init_layer}."))}
    hf.update({k: t.float() for k, t in read_tensors(target_path, lambda n: n == "model.norm.weight")})
    embed, head = target_embed_and_head(target_path)
    hf["model.embed_tokens.weight"] = embed.float()
    hf["lm_head.weight"] = head.float()
    ours = our_state_dict(cfg, hf)
    with torch.no_grad():
        for k, v in ours.items():
            if k.startswith("layers.0.") or k == "norm_weight":
                model.get_parameter(k).copy_(v)
        g = torch.Generator().manual_seed(seed)
        H = cfg.hidden_size
        model.fc_weight.copy_(torch.randn(model.fc_weight.shape, generator=g) / math.sqrt(model.fc_weight.shape[1]))
        model.in_weight.copy_(torch.randn(H, 2 * H, generator=g) / math.sqrt(2 * H))
        model.emb_norm_weight.fill_(1.0)
        model.feat_norm_weight.fill_(1.0)
    model.attach_target(embed.float(), head.float())
    model.init_rope(dtype=torch.float32)
    for name, prm in model.named_parameters():
        prm.requires_grad_(name not in ("embed.weight", "head_weight"))
    return model


def _shift(x: torch.Tensor, by: int) -> torch.Tensor:
    """x [..., n, d] moved `by` positions later along n (zeros enter at the front)."""
    if by == 0:
        return x
    return torch.cat([torch.zeros_like(x[..., :by, :]), x[..., :-by, :]], -2)


def ttt_attention(q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> torch.Tensor:
    """Attention of step j = len(ks) - 1. q [B, Hq, n, D]; ks, vs: steps 0..j, each [B, Hkv, n, D].
    Query p attends to step-0 keys at positions <= p - j and to step i's key at position p - j + i
    (i = 1..j): the keys inference would hold with the last j positions self-fed. -> [B, Hq, n, D]"""
    j = len(ks) - 1
    B, Hq, n, D = q.shape
    rep = Hq // ks[0].shape[1]
    k0, v0 = ks[0].repeat_interleave(rep, 1), vs[0].repeat_interleave(rep, 1)
    scale = 1.0 / math.sqrt(D)
    s0 = (q @ k0.transpose(-1, -2)) * scale  # [B, Hq, n, n]
    pos = torch.arange(n, device=q.device)
    s0 = s0.masked_fill(pos[None, :] > pos[:, None] - j, float("-inf"))
    diag, vals = [], []
    for i in range(1, j + 1):
        ki = _shift(ks[i].repeat_interleave(rep, 1), j - i)
        vi = _shift(vs[i].repeat_interleave(rep, 1), j - i)
        si = (q * ki).sum(-1) * scale  # [B, Hq, n]
        diag.append(si.masked_fill(pos < j - i, float("-inf")))
        vals.append(vi)
    if not diag:
        return torch.softmax(s0, -1) @ v0
    p = torch.softmax(torch.cat([s0, torch.stack(diag, -1)], -1), -1)
    out = p[..., :n] @ v0
    for i, vi in enumerate(vals):
        out = out + p[..., n + i, None] * vi
    return out


def ttt_hidden(model: FeatureDraft, ids: torch.Tensor, fused: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Training forward: ids [B, n], fused target features [B, n, nf*H] -> the layer outputs of
    steps 0..steps-1, each [B, n, H] (differentiable)."""
    layer = model.layers[0]
    n = ids.shape[1]
    cos, sin = model.rope_cos[:n, None], model.rope_sin[:n, None]
    g_prev = _shift(model.project(fused), 1)  # position p reads the feature of p - 1
    ks, vs, outs = [], [], []
    B = ids.shape[0]
    for j in range(steps):
        x = model.inputs(ids, g_prev if j == 0 else _shift(outs[-1], 1))
        q, k, v = layer._qkv(x, cos.to(x.dtype), sin.to(x.dtype), lambda h: F.linear(h, layer.qkv_weight, layer.qkv_bias))
        ks.append(k)
        vs.append(v)
        a = ttt_attention(q, ks, vs).transpose(1, 2).reshape(B, n, layer.Hq * layer.D)
        outs.append(layer._rest(x, a, lambda t, name, w, b=None: F.linear(t, w, b)))
    return outs


def _batch(examples: list[Example]):
    ids, tl, ti, mask = collate(examples)
    fused = torch.zeros(ids.shape[0], ids.shape[1], examples[0].features.shape[1])
    for r, e in enumerate(examples):
        fused[r, :len(e.ids)] = e.features.float()
    return ids, fused, tl, ti, mask


def step_weights(steps: int, decay: float) -> list[float]:
    w = [decay ** j for j in range(steps)]
    return [x / sum(w) for x in w]


def ttt_loss(model: FeatureDraft, examples: list[Example], cfg, use_bf16: bool):
    """Weighted sum over the unrolled steps of the distillation loss at the answer positions.
    -> (loss, KL of step 0)"""
    ids, fused, tl, ti, mask = _batch(examples)
    rows = mask.nonzero(as_tuple=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
        outs = ttt_hidden(model, ids, fused, cfg.ttt_steps)
        logits = [model.logits(h[rows]) for h in outs]  # [N, Vh] each: the head only where there is a teacher
    total, kl0 = 0.0, None
    m = torch.ones(1, len(rows[0]), dtype=torch.bool)
    for w, lg in zip(step_weights(cfg.ttt_steps, cfg.ttt_decay), logits):
        loss, kl = distill_loss(lg.float()[None], tl[rows][None], ti[rows][None], m, cfg.ce_weight)
        total = total + w * loss
        kl0 = kl if kl0 is None else kl0
    return total, kl0


@torch.no_grad()
def evaluate_feature(model: FeatureDraft, examples: list[Example], batch_size: int = 8, steps: int = 8) -> dict:
    """Held-out top-1 agreement with the target's greedy token at every answer position, with 0
    self-fed positions ("agreement", the standalone draft's measure) and with j = 1..steps-1
    ("agreement_selffed": the same positions reached through j self-fed features, tokens true)."""
    was = model.training
    model.eval()
    hits = [0] * steps
    total = 0
    kl_sum = 0.0
    in_head = 0
    head_set = set(model.head_ids.tolist())
    for b0 in range(0, len(examples), batch_size):
        rows_ex = examples[b0:b0 + batch_size]
        ids, fused, tl, ti, mask = _batch(rows_ex)
        outs = ttt_hidden(model, ids, fused, steps)
        want = torch.full_like(ids, -1)
        for r, e in enumerate(rows_ex):
            for t in range(e.prompt_len - 1, len(e.ids) - 1):
                want[r, t] = e.ids[t + 1] if e.target_top1 is None else int(e.target_top1[t - e.teacher_from])
        sel = want >= 0
        total += int(sel.sum())
        in_head += sum(int(x) in head_set for x in want[sel].tolist())
        for j, h in enumerate(outs):
            lg = model.logits(h)
            hits[j] += int((model.head_ids[lg.argmax(-1)] == want)[sel].sum())
            if j == 0:
                _, kl = distill_loss(lg, tl, ti, mask, 0.0)
                kl_sum += float(kl) * int(mask.sum())
    model.train(was)
    n = max(total, 1)
    return {"agreement": hits[0] / n, "agreement_selffed": [h / n for h in hits[1:]], "kl": kl_sum / n,
            "positions": total, "head_coverage": in_head / n}


@torch.no_grad()
def feature_acceptance_curve(model: FeatureDraft, examples: list[Example], k: int = 8, positions: int = 256,
                             seed: int = 0, prefix_selffed: int = 0) -> dict:
    """Offline n-alpha curve through the inference path (KV cache): from a random answer
    position t of a greedy answer, the context up to t is fed with true features, then the
    drafter proposes k tokens greedily, each on its own previous proposal and its own h
    (self-fed). alpha[n]: share of proposal n (n self-fed positions before it) equal to the
    target's greedy token, among rows whose earlier proposals all matched.
    prefix_selffed = s: the last s context tokens are fed self-fed too (true tokens, the
    drafter's own features), as SSD's speculations are; proposal n then sits s + n deep."""
    was = model.training
    model.eval()
    rng = torch.Generator().manual_seed(seed)
    s = prefix_selffed
    cands = [(e, t) for e in examples if e.greedy for t in range(max(e.prompt_len - 1, s + 1), len(e.ids) - 1 - k)]
    pick = torch.randperm(len(cands), generator=rng)[:positions].tolist()
    hits, tries, accepted = [0] * k, [0] * k, []
    for i in pick:
        e, t = cands[i]
        ids = torch.tensor(e.ids[:t + 1])
        g = model.project(e.features[:t + 1].float())  # [t+1, H]: g[p] = feature of p
        cache = model.new_cache(1, t + k + 2)
        known = t + 1 - s  # positions 0 .. known-1 read true features
        g_prev = torch.cat([torch.zeros(1, g.shape[1]), g[:known - 1]])  # [known, H]
        _, h = model(ids[None, :known], g_prev[None], append_batch([0], [0], [known]), cache)
        last_h = h[0, -1]
        for p in range(known, t + 1):  # the self-fed tail of the context
            _, h = model(ids[None, p:p + 1], last_h[None, None], append_batch([0], [p], [1]), cache)
            last_h = h[0, -1]
        lg = model.logits(last_h)
        alive, acc, pos = True, 0, t + 1
        for n in range(k):
            prop = int(model.head_ids[lg.argmax(-1)])
            ok = prop == e.ids[t + 1 + n]
            if alive:
                tries[n] += 1
                hits[n] += ok
                acc += ok
                alive = ok
            if not alive:
                break
            lg, h = model(torch.tensor([[prop]]), last_h[None, None], append_batch([0], [pos], [1]), cache)
            lg, last_h, pos = lg[0, -1], h[0, -1], pos + 1
        accepted.append(acc)
    model.train(was)
    return {"alpha": [h / t if t else float("nan") for h, t in zip(hits, tries)], "counts": tries,
            "positions": len(accepted), "mean_accepted": sum(accepted) / max(len(accepted), 1),
            "prefix_selffed": s}


def save_feature_draft(out_dir, model: FeatureDraft, target_path, target_ref: str,
                       dtype: torch.dtype = torch.float16) -> Path:
    from ssd.models.draft_dir import FORMAT_VERSION
    from ssd.train.draft_io import write_draft_dir

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = feature_config(json.loads((Path(target_path) / "config.json").read_text()))
    cfg["ssd_draft"] = {"kind": "feature", "target": str(target_ref), "feature_layers": list(model.feature_layers),
                        "head_vocab_size": int(model.head_ids.numel()), "embed_from_target": True,
                        "head_from_target": True, "version": FORMAT_VERSION}
    write_draft_dir(out, cfg, model.own_state_dict(), dtype)
    return out



def train_feature_draft(cfg, target_path, target_ref: str, head_ids, feature_layers, train_ex, eval_ex,
                        train_tokens: int, train_m: dict, eval_dir, state: Path, command_line: str, t_start: float,
                        deadline) -> dict:
    """`ssd train-draft --kind feature --data ...`: train, evaluate (agreement at self-fed depth
    0..7, n-alpha curves with 0 and K+1 = 5 self-fed context positions), write the directory."""
    import os
    import time

    from ssd.models.loader import read_config
    from ssd.train.draft_io import SAVE_DTYPES
    from ssd.train.loop import train

    tcfg = read_config(target_path)
    init_layer = cfg.feature_init_layer if cfg.feature_init_layer >= 0 else tcfg.num_layers - 1
    model = feature_draft_from_target(target_path, feature_layers, head_ids, init_layer, cfg.seed)
    curve_eval = eval_ex
    quick = eval_ex[: max(16, len(eval_ex) // 4)]  # the periodic evaluation during training
    curve0 = feature_acceptance_curve(model, curve_eval, positions=cfg.curve_positions)
    summary = train(model, train_ex, quick, cfg, state, deadline,
                    loss_fn=ttt_loss, eval_fn=lambda m, ex: evaluate_feature(m, ex))
    final = evaluate_feature(model, eval_ex)
    curve = feature_acceptance_curve(model, curve_eval, positions=cfg.curve_positions)
    curve_ssd = feature_acceptance_curve(model, curve_eval, positions=cfg.curve_positions, prefix_selffed=5)
    out = Path(cfg.out)
    save_feature_draft(out, model, target_path, target_ref, dtype=SAVE_DTYPES[cfg.save_dtype])
    info = {
        "kind": "feature", "target": target_ref, "feature_layers": list(feature_layers), "init_layer": init_layer,
        "head_vocab": int(head_ids.numel()), "data": str(cfg.data), "eval_data": str(eval_dir),
        "train_sequences": len(train_ex), "train_answer_tokens": train_tokens, "eval_sequences": len(eval_ex),
        "data_tokens_per_s": train_m.get("tokens_per_s"), "data_dtype": train_m.get("dtype"),
        "ttt_steps": cfg.ttt_steps, "ttt_decay": cfg.ttt_decay,
        "acceptance_curve": curve, "acceptance_curve_ssd": curve_ssd, "acceptance_curve_init": curve0,
        "file_bytes": (out / "model.safetensors").stat().st_size, "save_dtype": cfg.save_dtype,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "wall_s_this_run": round(time.time() - t_start, 1), "command_line": command_line,
        **summary, "eval": final,
    }
    (state / "summary.json").write_text(json.dumps(info, indent=2))
    _plot(out / "acceptance.png", info, state / "log.jsonl")
    (out / "README.md").write_text(feature_model_card(cfg, info))
    return info


def _plot(path: Path, info: dict, log_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ssd.train.cards import plot_alpha_curves

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    sd = "trained, SD (0 self-fed context)"
    plot_alpha_curves(a, [("at init", info["acceptance_curve_init"]), (sd, info["acceptance_curve"]),
                          ("trained, SSD-like (5 self-fed context)", info["acceptance_curve_ssd"])],
                      sd, "feature drafter: n-alpha, held-out ShareGPT")
    ev = info["eval"]
    depth = [ev["agreement"]] + list(ev["agreement_selffed"])
    b.plot(range(len(depth)), depth, marker="o", label="teacher-forced tokens, j self-fed features")
    log = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    b.set_xlabel("self-fed depth j")
    b.set_ylabel("held-out top-1 agreement")
    b.set_ylim(0, 1)
    b.set_title(f"after {info['steps']} steps ({len(log)} evaluations logged)")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def feature_model_card(cfg, info: dict) -> str:
    ev, c, cs, c0 = info["eval"], info["acceptance_curve"], info["acceptance_curve_ssd"], info["acceptance_curve_init"]
    fmt = lambda xs: " / ".join(f"{x:.2f}" for x in xs)
    lines = [
        f"# Feature drafter for {info['target']} (`ssd train-draft --kind feature`)",
        "",
        "One decoder layer over the target's own hidden states (the inputs of target layers "
        f"{info['feature_layers']}, fused by fc), its token's embedding, and the target's head restricted to "
        f"{info['head_vocab']} tokens. The embedding and head rows are read from the target at load time; "
        "this directory holds fc, the input projection, the layer and the norms (ssd/models/feature_draft.py). "
        f"Trained with training-time test: {info['ttt_steps']} unrolled steps on its own features.",
        "",
        "| | |",
        "|---|---|",
        f"| held-out top-1 agreement, true features | **{ev['agreement']:.3f}** |",
        f"| ... with j = 1..{len(ev['agreement_selffed'])} self-fed features (tokens true) | {fmt(ev['agreement_selffed'])} |",
        f"| n-alpha, SD (context true-fed) | {fmt(c['alpha'])}; {c['mean_accepted']:.2f} accepted per round of {len(c['alpha'])} (at init {c0['mean_accepted']:.2f}) |",
        f"| n-alpha, 5 self-fed context positions (SSD's case at K = 4) | {fmt(cs['alpha'])}; {cs['mean_accepted']:.2f} per round |",
        f"| held-out KL(target ‖ draft) over the head | {ev['kl']:.3f} |",
        f"| data | `ssd make-data --features`: {info['train_sequences']} sequences, {info['train_answer_tokens']} answer "
        f"tokens ({info['data_dtype']}, made at {info['data_tokens_per_s']} tok/s); held out: {info['eval_sequences']} sequences of ShareGPT 15,000+ |",
        f"| training | {info['steps']} steps of {cfg.batch_size} x <= {cfg.seq_len} tokens, {info['matmuls']}, "
        f"step weights {info['ttt_decay']}^j" + (", stopped early by the time budget" if info["stopped_early"] else "") + " |",
        f"| wall time | training {info['train_wall_s']:.0f} s, whole run {info['wall_s_this_run']:.0f} s |",
        f"| hardware | {info['cpu_count']} CPU cores, {info['torch_threads']} torch threads, torch {info['torch']}, no GPU |",
        f"| file | model.safetensors, {info['file_bytes'] / 1e6:.1f} MB ({info['save_dtype']}) |",
        "",
        "![held-out acceptance](acceptance.png)",
        "",
        f"Command: `{info.get('command_line') or 'ssd train-draft --kind feature --data ...'}`",
        "",
    ]
    return "\n".join(lines)
