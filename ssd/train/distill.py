"""`ssd train-draft`: distil a small draft from the target it will serve.

Pipeline: generated prompts -> the target's own greedy continuations (batched AR engine) ->
head vocabulary (most frequent generated tokens) -> teacher distributions (one target forward
per batch of whole sequences, top-k over the head kept) -> KL(target || draft) training of a
draft initialised from target layers -> held-out top-1 agreement (the greedy acceptance proxy)
-> the draft directory (ssd/train/draft_io.py). OUT/train_state holds data, teacher targets and
checkpoints, so --resume neither regenerates nor retrains what is done.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ssd.kv_cache import append_batch
from ssd.train.config import TrainDraftConfig, config_from_args
from ssd.train.draft_model import DraftModel, grow_draft, grown_sources

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Example:
    ids: list[int]  # prompt + target continuation, truncated to seq_len
    prompt_len: int
    teacher_logits: torch.Tensor | None = None  # [m, k] fp16, target logits of its top-k head tokens
    teacher_idx: torch.Tensor | None = None  # [m, k] int32, head indices of those tokens
    teacher_from: int = 0  # teacher row j is position teacher_from + j
    teacher_valid: torch.Tensor | None = None  # [m] bool: rows with some head token (None: all)
    target_top1: torch.Tensor | None = None  # [m] int64: the target's argmax over the whole vocabulary
    greedy: bool = True  # the continuation is the target's greedy answer (not a sampled one)
    features: torch.Tensor | None = None  # [n, nf*H] bf16: the target's fused features per position (feature drafters)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# ---- 1-2. the target's own greedy continuations -------------------------------------------
def generate_continuations(target, eos_token_ids, prompt_ids: list[list[int]], gen_tokens: int, gen_batch: int,
                           store: Path | None = None, key: dict | None = None, chunk: int = 64) -> tuple[list[list[int]], float]:
    """Greedy outputs of the target for every prompt; saved to `store` every `chunk` prompts and
    reused from it when its key matches (a resumed run does not regenerate). -> (outputs, seconds)"""
    from ssd.config import EngineConfig, SamplingParams
    from ssd.engine import AREngine

    done: dict[int, list[int]] = {}
    spent = 0.0
    if store is not None and store.exists():
        saved = torch.load(store, weights_only=False)
        if saved.get("key") == key:
            done, spent = saved["outputs"], saved["seconds"]
    todo = [i for i in range(len(prompt_ids)) if i not in done]
    if todo:
        max_len = max(len(p) for p in prompt_ids) + gen_tokens + 8
        cfg = EngineConfig(mode="ar", max_batch=gen_batch, max_model_len=max(16, max_len),
                           target_threads=torch.get_num_threads())
        engine = AREngine(cfg, target, tuple(eos_token_ids))
        params = SamplingParams(max_tokens=gen_tokens)
        bar = tqdm(total=len(prompt_ids), initial=len(done), desc="target continuations", unit="prompt")
        for c0 in range(0, len(todo), chunk):
            idx = todo[c0:c0 + chunk]
            t0 = time.perf_counter()
            seqs = {i: engine.add_request(prompt_ids[i], params) for i in idx}
            finished = 0
            while engine.has_unfinished():
                engine.step()
                now = sum(s.finished for s in seqs.values())
                bar.update(now - finished)
                finished = now
            spent += time.perf_counter() - t0
            done.update({i: list(s.output_ids) for i, s in seqs.items()})
            ntok = sum(len(v) for v in done.values())
            bar.set_postfix_str(f"{ntok / max(spent, 1e-9):.0f} tok/s")
            if store is not None:
                _atomic_save({"key": key, "outputs": done, "seconds": spent}, store)
        bar.close()
    return [done[i] for i in range(len(prompt_ids))], spent


# ---- 3. head vocabulary -------------------------------------------------------------------
def select_head(token_seqs: list[list[int]], vocab_size: int, head_vocab: int, always=()) -> torch.Tensor:
    """The head_vocab most frequent tokens of token_seqs (ties and padding by lowest id), always
    including `always` (EOS, chat special tokens). -> sorted token ids [Vh] int64"""
    head_vocab = min(head_vocab, vocab_size)
    always = sorted({int(t) for t in always if 0 <= int(t) < vocab_size})
    if len(always) > head_vocab:
        raise ValueError(f"{len(always)} always-kept tokens do not fit a {head_vocab}-token head")
    flat = torch.tensor([t for s in token_seqs for t in s], dtype=torch.int64)
    counts = torch.bincount(flat, minlength=vocab_size).double() if flat.numel() else torch.zeros(vocab_size, dtype=torch.float64)
    counts[always] = math.inf
    # stable sort on descending count keeps ascending ids among equal counts
    order = torch.sort(-counts, stable=True).indices
    return torch.sort(order[:head_vocab]).values


# ---- 2. teacher distributions ---------------------------------------------------------------
@torch.inference_mode()
def teacher_targets(target, examples: list[Example], head_ids: torch.Tensor, topk: int, batch_size: int = 8,
                    desc: str = "teacher forward") -> None:
    """Fills each example's teacher_logits/teacher_idx: the target's logits at every position,
    restricted to the head vocabulary, top-k kept (one forward per batch of whole sequences)."""
    k = min(topk, head_ids.numel())
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))  # similar lengths together
    bar = tqdm(total=sum(len(e.ids) for e in examples), desc=desc, unit="tok")
    for b0 in range(0, len(order), batch_size):
        rows = [examples[i] for i in order[b0:b0 + batch_size]]
        lens = [len(e.ids) for e in rows]
        n = max(lens)
        ids = torch.zeros(len(rows), n, dtype=torch.int64)
        for r, e in enumerate(rows):
            ids[r, :len(e.ids)] = torch.tensor(e.ids)
        cache = target.new_cache(len(rows), n)
        logits = target(ids, append_batch(list(range(len(rows))), [0] * len(rows), lens), cache)  # [B, n, V]
        vals, idx = logits[..., head_ids].topk(k, dim=-1)  # [B, n, k]
        for r, e in enumerate(rows):
            e.teacher_logits = vals[r, :len(e.ids)].half().clone()
            e.teacher_idx = idx[r, :len(e.ids)].int().clone()
        bar.update(sum(lens))
    bar.close()


# ---- 2b. examples from `ssd make-data` shards ------------------------------------------------
def examples_from_shards(seqs: list[dict], head_ids: torch.Tensor, vocab_size: int, seq_len: int,
                         min_context: int = 32, with_features: bool = False) -> list[Example]:
    """Shard sequences (ssd/train/data.py: load_shards) -> Examples of at most seq_len tokens whose
    teacher is the target's top-k restricted to the head: in-head entries first (so column 0 is
    the target's best head token), the others at -inf; rows with no head token are not trained on.
    A sequence longer than seq_len keeps its answer and loses the start of its prompt (RoPE is
    relative, so a window starting later is the same computation), keeping at least
    `min_context` prompt tokens before the answer. with_features: also the window's fused target
    features (the shards must have been made with --features)."""
    to_head = torch.full((vocab_size,), -1, dtype=torch.int64)
    to_head[head_ids] = torch.arange(head_ids.numel())
    out = []
    for sq in seqs:
        ids, p0 = sq["ids"].long(), int(sq["prompt_len"])
        start = max(0, min(len(ids) - seq_len, p0 - min_context))
        ids = ids[start:start + seq_len]
        p, n = p0 - start, min(len(ids), seq_len)
        m = n - p  # teacher rows inside the window: positions p-1 .. n-2
        if m < 1:
            continue
        hidx = to_head[sq["teacher_idx"][:m].long()]  # [m, k], -1 outside the head
        inside = hidx >= 0
        order = torch.sort((~inside).int(), dim=-1, stable=True).indices  # in-head first, order kept
        hidx, inside = hidx.gather(-1, order), inside.gather(-1, order)
        logits = sq["teacher_logits"][:m].float().gather(-1, order).masked_fill(~inside, float("-inf"))
        feats = None
        if with_features:
            f = sq["features"][:, start:start + n]  # [nf, n, H]
            feats = f.permute(1, 0, 2).reshape(n, -1).contiguous()
        out.append(Example(ids[:n].tolist(), p, logits.half(), hidx.clamp(min=0).int(), teacher_from=p - 1,
                           teacher_valid=inside.any(-1), target_top1=sq["teacher_idx"][:m, 0].long(),
                           greedy=not sq.get("sampled", False) and sq.get("answer_from", "target") == "target",
                           features=feats))
    return out


# ---- 5. loss -----------------------------------------------------------------------------------
def collate(examples: list[Example]):
    """-> ids [B, n] int64, teacher logits [B, n, k] fp32, teacher idx [B, n, k] int64, mask [B, n] bool
    (the positions with a teacher row)"""
    B, n, k = len(examples), max(len(e.ids) for e in examples), examples[0].teacher_idx.shape[1]
    ids = torch.zeros(B, n, dtype=torch.int64)
    tl = torch.zeros(B, n, k)
    ti = torch.zeros(B, n, k, dtype=torch.int64)
    mask = torch.zeros(B, n, dtype=torch.bool)
    for r, e in enumerate(examples):
        ids[r, :len(e.ids)] = torch.tensor(e.ids)
        f, m = e.teacher_from, e.teacher_idx.shape[0]
        tl[r, f:f + m] = e.teacher_logits.float()
        ti[r, f:f + m] = e.teacher_idx.long()
        mask[r, f:f + m] = True if e.teacher_valid is None else e.teacher_valid
    return ids, tl, ti, mask


def distill_loss(draft_logits, teacher_logits, teacher_idx, mask, ce_weight: float):
    """KL(target || draft) over the head vocabulary + ce_weight * CE on the target's top head token.
    The target's distribution is renormalised over its top-k head tokens; the draft's over the
    whole head. -> (loss, mean KL) scalars"""
    logq = F.log_softmax(draft_logits, -1)  # [B, n, Vh]
    teacher_logits = teacher_logits.masked_fill(~mask[..., None], 0.0)  # rows not trained on: any finite values
    logp = F.log_softmax(teacher_logits, -1)  # [B, n, k]; -inf columns (outside the head) get p = 0
    p = logp.exp()
    logq_k = logq.gather(-1, teacher_idx)  # [B, n, k]
    kl = torch.where(p > 0, p * (logp - logq_k), 0.0).sum(-1)  # [B, n]
    ce = -logq_k[..., 0]  # topk is sorted: column 0 is the target's argmax over the head
    w = mask.float()
    denom = w.sum().clamp(min=1)
    kl_mean = (kl * w).sum() / denom
    return kl_mean + ce_weight * (ce * w).sum() / denom, kl_mean


ANSWER_BINS = ((16, "1-16"), (64, "17-64"), (None, "65+"))  # (last answer position, label); 1 = its first token


def _answer_bin(pos: int) -> str:
    return next(label for hi, label in ANSWER_BINS if hi is None or pos <= hi)


@torch.no_grad()
def evaluate(draft: DraftModel, examples: list[Example], batch_size: int = 8) -> dict:
    """Held-out greedy top-1 agreement with the target on its continuation positions (position
    t predicts ids[t+1], the target's greedy token there): the per-token acceptance proxy.
    Also by position in the answer: a bench of short answers reads only their openings, where
    agreement is lower than over whole answers (docs/draft-training.md)."""
    draft.eval()
    agree = total = in_head = 0
    by_pos = {}  # bin -> [agree, total]
    kl_sum = kl_n = 0.0
    head_set = set(draft.head_token_ids.tolist())
    for b0 in range(0, len(examples), batch_size):
        rows = examples[b0:b0 + batch_size]
        ids, tl, ti, mask = collate(rows)
        logits = draft(ids)  # [B, n, Vh]
        _, kl = distill_loss(logits, tl, ti, mask, 0.0)
        kl_sum += float(kl) * int(mask.sum())
        kl_n += int(mask.sum())
        pred = draft.head_token_ids[logits.argmax(-1)]  # [B, n] token ids
        for r, e in enumerate(rows):
            for t in range(e.prompt_len - 1, len(e.ids) - 1):
                # the target's greedy token here: its argmax when recorded (sampled answers), else the next id
                want = e.ids[t + 1] if e.target_top1 is None else int(e.target_top1[t - e.teacher_from])
                hit = int(pred[r, t]) == want
                agree += hit
                in_head += want in head_set
                total += 1
                b = by_pos.setdefault(_answer_bin(t - e.prompt_len + 2), [0, 0])
                b[0] += hit
                b[1] += 1
    draft.train()
    return {"agreement": agree / max(total, 1), "kl": kl_sum / max(kl_n, 1), "positions": total,
            "head_coverage": in_head / max(total, 1),
            "agreement_by_answer_position": {k: {"agreement": a / n, "positions": n} for k, (a, n) in by_pos.items()}}


@torch.no_grad()
def acceptance_curve(draft: DraftModel, examples: list[Example], k: int = 8, positions: int = 256,
                     batch_size: int = 16, seed: int = 0) -> dict:
    """Offline n-alpha curve on greedy continuations: from a random answer position t the draft
    proposes k tokens greedily, each fed its own previous proposals; alpha[n] is the share of
    proposals n (0-based: n self-fed tokens before it) equal to the target's greedy token, among
    those whose n predecessors all matched (what speculative decoding accepts). -> {"alpha": [k],
    "counts": [k], "mean_accepted": expected accepted tokens per round of k}"""
    draft.eval()
    rng = torch.Generator().manual_seed(seed)
    cands = [(e, t) for e in examples if e.greedy for t in range(e.prompt_len - 1, len(e.ids) - 1 - k)]
    pick = torch.randperm(len(cands), generator=rng)[:positions].tolist()
    hits, tries = [0] * k, [0] * k
    accepted = []
    for b0 in range(0, len(pick), batch_size):
        rows = [cands[i] for i in pick[b0:b0 + batch_size]]
        ctx = [list(e.ids[:t + 1]) for e, t in rows]
        alive = [True] * len(rows)
        acc = [0] * len(rows)
        for n in range(k):
            width = max(len(c) for c in ctx)
            ids = torch.tensor([c + [0] * (width - len(c)) for c in ctx])
            logits = draft(ids)  # [B, width, Vh]
            last = torch.tensor([len(c) - 1 for c in ctx])
            prop = draft.head_token_ids[logits[torch.arange(len(ctx)), last].argmax(-1)]  # [B]
            for r, (e, t) in enumerate(rows):
                ok = int(prop[r]) == e.ids[t + 1 + n]
                if alive[r]:
                    tries[n] += 1
                    hits[n] += ok
                    acc[r] += ok
                    alive[r] = ok
                ctx[r].append(int(prop[r]))
        accepted += acc
    draft.train()
    alpha = [h / t if t else float("nan") for h, t in zip(hits, tries)]
    return {"alpha": alpha, "counts": tries, "positions": len(accepted),
            "mean_accepted": sum(accepted) / max(len(accepted), 1)}


# ---- 5-6. training loop ---------------------------------------------------------------------
def _lr_lambda(cfg: TrainDraftConfig):
    warm = min(cfg.warmup_steps, max(cfg.steps // 10, 1))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(cfg.steps - warm, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))  # cosine down to lr/10
    return f


def _train_bf16(setting: str) -> bool:
    """Mixed precision for the draft's matmuls: bf16 autocast where the CPU has native bf16
    ("auto"; about 2x faster per step here), always ("bfloat16") or never ("off")."""
    if setting == "auto":
        from ssd.models.precision import cpu_has_native_bf16

        return cpu_has_native_bf16()
    return setting == "bfloat16"


def _batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    # a pure function of the step: a resumed run sees exactly the batches an uninterrupted one does
    out = []
    for j in range(batch_size):
        g = step * batch_size + j
        epoch, pos = divmod(g, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[pos]))
    return out


def standalone_loss(draft: DraftModel, examples: list[Example], cfg: TrainDraftConfig, use_bf16: bool):
    ids, tl, ti, mask = collate(examples)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):  # fp32 weights and loss either way
        logits = draft(ids)
    return distill_loss(logits.float(), tl, ti, mask, cfg.ce_weight)


def train(draft, train_ex: list[Example], eval_ex: list[Example], cfg: TrainDraftConfig,
          state_dir: Path, deadline: float | None = None, stop_after: int | None = None,
          loss_fn=standalone_loss, eval_fn=evaluate) -> dict:
    """Trains draft in place from step 0 or from state_dir/ckpt.pt (cfg.resume), up to cfg.steps
    (the schedule's length) or stop_after steps, checkpointing at each eval and at the stop.
    loss_fn(draft, examples, cfg, use_bf16) -> (loss, kl); eval_fn(draft, eval_ex) -> {"agreement", ...}
    (the feature drafter brings its own: ssd/train/feature_train.py). -> summary"""
    state_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = state_dir / "ckpt.pt", state_dir / "log.jsonl"
    params = [p for p in draft.parameters() if p.requires_grad]
    use_bf16 = _train_bf16(cfg.autocast)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    step, wall = 0, 0.0
    if cfg.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        if not torch.equal(ck["model"]["head_token_ids"], draft.own_state_dict()["head_token_ids"]):
            raise ValueError("checkpoint head vocabulary differs from this run's")
        draft.load_own_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        sched.load_state_dict(ck["sched"])
        torch.set_rng_state(ck["rng"])
        step, wall = ck["step"], ck["wall_s"]
        tqdm.write(f"resumed from step {step}")
    elif log_path.exists():
        log_path.unlink()

    def log(rec):
        with log_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        tqdm.write(json.dumps(rec))

    def checkpoint():
        _atomic_save({"model": draft.own_state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
                      "rng": torch.get_rng_state(), "step": step, "wall_s": wall}, ckpt_path)

    first = eval_fn(draft, eval_ex) if step == 0 else None
    if first is not None:
        log({"step": 0, "eval": first})
    draft.train()
    last_eval = first
    bar = tqdm(total=cfg.steps, initial=step, desc="training draft", unit="step")
    stopped_early = False
    t_train0, steps_here = time.perf_counter(), 0
    while step < cfg.steps:
        t0 = time.perf_counter()
        loss, kl = loss_fn(draft, [train_ex[i] for i in _batch_indices(step, len(train_ex), cfg.batch_size, cfg.seed)],
                           cfg, use_bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        steps_here += 1
        wall += time.perf_counter() - t0
        bar.update()
        loss, kl = float(loss.detach()), float(kl.detach())
        bar.set_postfix(loss=f"{loss:.3f}", kl=f"{kl:.3f}")
        out_of_time = (deadline is not None and time.time() > deadline) or step == stop_after
        if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
            last_eval = eval_fn(draft, eval_ex)
            log({"step": step, "loss": loss, "kl": kl, "lr": sched.get_last_lr()[0],
                 "train_wall_s": round(wall, 1), "eval": last_eval})
            checkpoint()
        if out_of_time and step < cfg.steps:
            tqdm.write(f"stopping at step {step} ({'stop_after' if step == stop_after else 'time budget'})")
            stopped_early = True
            break
    bar.close()
    if last_eval is None:
        last_eval = eval_fn(draft, eval_ex)
    rate = steps_here / max(time.perf_counter() - t_train0, 1e-9)
    return {"steps": step, "train_wall_s": wall, "steps_per_s": rate, "stopped_early": stopped_early,
            "matmuls": "bf16 autocast" if use_bf16 else "fp32",
            "eval": last_eval, "eval_step0": first}


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
        _atomic_save({"key": tkey, "targets": [(e.teacher_logits, e.teacher_idx) for e in examples]}, tstore)
    del target

    draft = draft_from_target(target_path, cfg.layers, head_ids, cfg.init_layers)
    summary = train(draft, train_ex, eval_ex, cfg, state, deadline)
    dtype = _DTYPES[cfg.save_dtype]
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
    save_draft(out, draft, target_path, target_ref, dtype=_DTYPES[cfg.save_dtype])
    info = {
        "target": target_ref, "layers": cfg.layers,
        "init_layers": (f"the draft in `{cfg.init_from}` (continued{_grown(grown_from, cfg.layers, tcfg)})"
                        if earlier is not None else
                        f"{cfg.init_layers} (target layers {init_layer_ids(tcfg.num_layers, cfg.layers, cfg.init_layers)})"),
        "earlier_training": _earlier_training(cfg.init_from) if earlier is not None else [],
        "sources": sources,
        "head_vocab": int(head_ids.numel()), "data": str(cfg.data), "eval_data": str(eval_dir),
        "train_sequences": len(train_ex), "train_answer_tokens": train_tokens, "eval_sequences": len(eval_ex),
        "acceptance_curve": curve, "acceptance_curve_init": curve0,
        "file_bytes": (out / "model.safetensors").stat().st_size, "save_dtype": cfg.save_dtype,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "wall_s_this_run": round(time.time() - t_start, 1), "command_line": command_line, **summary,
    }
    (state / "summary.json").write_text(json.dumps(info, indent=2))
    _plot_curves(out / "acceptance.png", info, state / "log.jsonl")
    (out / "README.md").write_text(data_model_card(cfg, info))
    return info


def _grown(old_layers: int, layers: int, tcfg) -> str:
    if old_layers == layers:
        return ""
    return (f", grown from {old_layers} to {layers} layers: target layers "
            f"{grown_sources(tcfg.num_layers, layers - old_layers)} inserted before its last, output projections zero")


def _earlier_training(draft_dir: str) -> list[list[str]]:
    """The data and training rows of a continued draft's model card (and the rows it carried
    from its own predecessors), so the new card keeps the whole history."""
    card = Path(draft_dir) / "README.md"
    rows = []
    for line in (card.read_text().splitlines() if card.exists() else []):
        cells = [c.strip() for c in line.strip().strip("|").split("|", 1)]
        if len(cells) == 2 and cells[0] in ("data", "training", "earlier data", "earlier training"):
            rows.append(["earlier " + cells[0].removeprefix("earlier "), cells[1]])
    return rows or [["earlier training", f"`{draft_dir}` (no model card found)"]]


def _plot_curves(path: Path, info: dict, log_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    init = "at init (the draft continued)" if info.get("earlier_training") else "at init (target layers)"
    plot_alpha_curves(a, [(init, info["acceptance_curve_init"]), ("trained", info["acceptance_curve"])],
                      "trained", "n-alpha curve, held-out ShareGPT")
    log = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    steps = [r for r in log if "eval" in r]
    b.plot([r["step"] for r in steps], [r["eval"]["agreement"] for r in steps], marker=".")
    b.set_xlabel("step")
    b.set_ylabel("held-out top-1 agreement")
    b.set_title("training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_alpha_curves(a, curves: list[tuple[str, dict]], annotated: str, title: str) -> None:
    """n-alpha curves on axes a; the curve named `annotated` labels each point with the number of
    proposals it rests on (the later points rest on few)."""
    for name, c in curves:
        a.plot(range(len(c["alpha"])), c["alpha"], marker="o", label=f"{name}: {c['mean_accepted']:.2f} tokens/round")
        if name == annotated:
            for n, (y, cnt) in enumerate(zip(c["alpha"], c["counts"])):
                if cnt:
                    a.annotate(str(cnt), (n, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    a.set_xlabel("n (self-fed draft tokens before this one); labels: proposals counted")
    a.set_ylabel("acceptance (greedy, held-out)")
    a.set_ylim(0, 1)
    a.legend(fontsize=7)
    a.set_title(title)


def _shards_note(info: dict) -> str:
    """Which shards of the fixed prompt order the data holds, and its seed when not the default
    (the seed picks which answers are sampled and draws their tokens, so a second pass over the
    same prompts with another seed is other data)."""
    shards = info.get("shards")
    if shards:
        contiguous = shards == list(range(shards[0], shards[-1] + 1))
        where = (f", shards {shards[0]}–{shards[-1]}" if contiguous and len(shards) > 1 else
                 f", shard {shards[0]}" if len(shards) == 1 else f", {len(shards)} shards") + " of the fixed prompt order"
    else:  # a summary written before shards were recorded
        where = f", from shard {info['first_shard']} of the fixed prompt order" if info.get("first_shard") else ""
    return where + (f", seed {info['data_seed']}" if info.get("data_seed") else "")


def _data_row(src: dict, mixed: bool) -> str:
    """One model-card row per --data directory (a summary from before several directories were
    allowed keeps its one source's keys at the top level, as `src` here)."""
    return ((f"| data | `ssd make-data --answers dataset`: ShareGPT's own replies in conversations 0-14,999 (first "
             f"turns and multi-turn contexts), scored by the target ({src['data_dtype']}) position by position"
             if src.get("answers") == "dataset" else
             f"| data | `ssd make-data`: the target's own answers ({src['data_dtype']}) to ShareGPT conversations "
             f"0-14,999 (first turns and multi-turn contexts) and generated code/math/chat prompts")
            + _shards_note(src)
            + (f", answers cut at {src['answer_cap']} tokens" if src.get("answer_cap") else "")
            + f"; {src['train_sequences']} sequences, {src['train_answer_tokens']} answer tokens, made at "
            f"{src['data_tokens_per_s']} tok/s" + ("; mixed and shuffled with the other data rows" if mixed else "") + " |")


def data_model_card(cfg: TrainDraftConfig, info: dict) -> str:
    ev, ev0, c, c0 = info["eval"], info.get("eval_step0") or {}, info["acceptance_curve"], info["acceptance_curve_init"]
    sources = info.get("sources") or [info]
    alpha = " / ".join(f"{x:.2f}" for x in c["alpha"])
    lines = [
        f"# Draft for {info['target']} (distilled by `ssd train-draft --data`)",
        "",
        f"A {cfg.layers}-layer Llama-style draft for speculative decoding of `{info['target']}`. It shares the target's",
        "tokenizer and reads the target's (frozen) embedding at load time; this directory holds only its own layers,",
        f"final norm and a reduced-vocabulary head of {info['head_vocab']} tokens (`head_token_ids`).",
        "",
        "| | |",
        "|---|---|",
        f"| held-out top-1 agreement with the target | **{ev['agreement']:.3f}**"
        + (f" (at init: {ev0['agreement']:.3f})" if ev0 else "") + " |",
        f"| held-out n-alpha (greedy, n = 0..{len(c['alpha']) - 1} self-fed tokens) | {alpha} |",
        f"| expected accepted draft tokens per round of {len(c['alpha'])} | {c['mean_accepted']:.2f} (at init: {c0['mean_accepted']:.2f}) |",
        f"| held-out KL(target ‖ draft) over the head, nats/token | {ev['kl']:.3f} |",
        f"| head vocabulary | {info['head_vocab']} tokens; covers {ev['head_coverage']:.3f} of the held-out target tokens |",
        f"| layers | {cfg.layers}, initialised from {info['init_layers']} |",
        *[f"| {k} | {v} |" for k, v in info.get("earlier_training", [])],
        *[_data_row(src, mixed=len(sources) > 1) for src in sources],
        f"| held-out data | ShareGPT conversations 15,000 onward, answered by the target itself"
        f"{' (as the training data)' if all(x.get('answers', 'target') == 'target' for x in sources) else ''}: "
        f"{info['eval_sequences']} sequences; never trained on |",
        f"| training | {info['steps']} steps of {cfg.batch_size} sequences x <= {cfg.seq_len} tokens, AdamW lr {cfg.lr} "
        f"(warmup, cosine), {info['matmuls']} matmuls, loss KL(top-k target over head || draft) + {cfg.ce_weight} x CE(target top-1)"
        + (", stopped early by the time budget" if info["stopped_early"] else "") + " |",
        f"| wall time | training {info['train_wall_s']:.0f} s, whole run {info['wall_s_this_run']:.0f} s |",
        f"| hardware | {info['cpu_count']} CPU cores, {info['torch_threads']} torch threads, torch {info['torch']}, no GPU |",
        f"| file | model.safetensors, {info['file_bytes'] / 1e6:.1f} MB ({info['save_dtype']}) |",
        "",
        "![held-out acceptance and training curve](acceptance.png)",
        "",
        f"Command: `{info.get('command_line') or 'ssd train-draft --data ...'}`",
        "",
    ]
    return "\n".join(lines)


def model_card(cfg: TrainDraftConfig, info: dict) -> str:
    ev, ev0 = info["eval"], info.get("eval_step0") or {}
    cats = info.get("categories")
    lines = [
        f"# Draft for {info['target']} (distilled by `ssd train-draft`)",
        "",
        f"A {cfg.layers}-layer Llama-style draft for greedy speculative decoding of `{info['target']}`. It shares the",
        "target's tokenizer and reads the target's (frozen) embedding at load time; this directory holds only its",
        f"own layers, final norm and a reduced-vocabulary head of {info['head_vocab']} tokens (`head_token_ids`).",
        "Load with `ssd.models.draft.load_draft({\"path\": <this dir>, \"target_path\": <target dir>})`.",
        "",
        "| | |",
        "|---|---|",
        f"| held-out top-1 agreement with the target (per-token greedy acceptance proxy) | **{ev['agreement']:.3f}**"
        + (f" (at init: {ev0['agreement']:.3f})" if ev0 else "") + " |",
        f"| held-out KL(target ‖ draft) over the head, nats/token | {ev['kl']:.3f}" + (f" (at init: {ev0['kl']:.3f})" if ev0 else "") + " |",
        f"| held-out positions evaluated | {ev['positions']} |",
        f"| head vocabulary | {info['head_vocab']} tokens; covers {ev['head_coverage']:.3f} of the held-out target tokens |",
        f"| layers | {cfg.layers}, initialised from {info['init_layers']} |",
        f"| data | {info['train_prompts']} train + {info['eval_prompts']} held-out generated prompts"
        + (f" ({cats})" if cats else "") + f"; the target's greedy continuations, up to {cfg.gen_tokens} tokens each,"
        f" {info['gen_tokens_total']} generated tokens in {info['gen_seconds']} s; none of ssd/data/bench_prompts.jsonl |",
        f"| training | {info['steps']} steps of {cfg.batch_size} sequences x <= {cfg.seq_len} tokens, AdamW lr {cfg.lr} "
        f"(warmup, cosine), loss KL(top-{cfg.teacher_topk} target over head || draft) + {cfg.ce_weight} x CE(target top-1)"
        + (", stopped early by the time budget" if info["stopped_early"] else "") + " |",
        f"| wall time | training {info['train_wall_s']:.0f} s, whole run {info['wall_s_this_run']:.0f} s |",
        f"| hardware | {info['cpu_count']} CPU cores, {info['torch_threads']} torch threads, torch {info['torch']}, no GPU |",
        f"| file | model.safetensors, {info['file_bytes'] / 1e6:.1f} MB ({info['save_dtype']}) |",
        "",
        f"Command: `{info.get('command_line', 'ssd train-draft ...')}`",
        "",
    ]
    return "\n".join(lines)


def run_train_draft(ns) -> int:
    from collections import Counter

    from ssd.models.loader import DEFAULT_TARGET, resolve_model
    from ssd.tokenizer import Tokenizer
    from ssd.train.prompts import build_prompts, split_eval

    t0 = time.time()
    cfg = config_from_args(TrainDraftConfig, ns)
    if cfg is None:
        return 2
    torch.set_num_threads(cfg.threads)
    deadline = t0 + cfg.time_budget_min * 60 if cfg.time_budget_min > 0 else None
    target_path = resolve_model(cfg.target)
    tok = Tokenizer(target_path)
    always = tuple(tok.eos_token_ids) + tuple(getattr(tok._tok, "all_special_ids", ()))  # chat special tokens
    ref = DEFAULT_TARGET if cfg.target in ("default", DEFAULT_TARGET) else str(target_path.resolve())
    if cfg.data:
        info = distill_from_data(cfg, target_path, ref, always, getattr(ns, "command_line", ""), deadline)
        c = info["acceptance_curve"]
        print(f"draft written to {cfg.out}: {info['steps']} steps on {info['train_answer_tokens']} answer tokens, "
              f"held-out agreement {info['eval']['agreement']:.3f}, n-alpha "
              + " ".join(f"{x:.2f}" for x in c["alpha"]) + f", {c['mean_accepted']:.2f} accepted per round")
        return 0
    prompts = build_prompts(cfg.num_prompts, cfg.seed)
    train_p, eval_p = split_eval(prompts, cfg.eval_prompts)
    enc = lambda ps: [tok.apply_chat_template([{"role": "user", "content": p["prompt"]}]) for p in ps]
    cats = ", ".join(f"{c} {n}" for c, n in Counter(p["category"] for p in prompts).most_common())
    Path(cfg.out, "train_state").mkdir(parents=True, exist_ok=True)
    Path(cfg.out, "train_state", "prompts.jsonl").write_text(
        "".join(json.dumps({**p, "split": "eval" if p in eval_p else "train"}) + "\n" for p in prompts))
    info = distill(cfg, target_path, ref, enc(train_p), enc(eval_p), always,
                   {"categories": cats, "command_line": getattr(ns, "command_line", "")}, deadline)
    ev = info["eval"]
    print(f"draft written to {cfg.out}: {info['steps']} steps, held-out agreement {ev['agreement']:.3f} "
          f"(init {info['eval_step0']['agreement'] if info.get('eval_step0') else float('nan'):.3f}), "
          f"head coverage {ev['head_coverage']:.3f}, {info['file_bytes'] / 1e6:.1f} MB; "
          f"generation {info['gen_tokens_per_s']} tok/s, training {info['steps_per_s']:.2f} steps/s")
    return 0
