"""The training loop shared by both draft kinds: AdamW with warmup and cosine decay, bf16 autocast
where it pays, periodic held-out evaluation, checkpoints every few steps (a stopped run resumes),
a time budget."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ssd.train.config import TrainDraftConfig
from ssd.train.evaluate import evaluate
from ssd.train.examples import Example, atomic_save
from ssd.train.objective import standalone_loss



# ---- 5-6. training loop ---------------------------------------------------------------------
def lr_lambda(cfg: TrainDraftConfig):
    warm = min(cfg.warmup_steps, max(cfg.steps // 10, 1))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(cfg.steps - warm, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))  # cosine down to lr/10
    return f


def train_bf16(setting: str) -> bool:
    """Mixed precision for the draft's matmuls: bf16 autocast where the CPU has native bf16
    ("auto"; about 2x faster per step here), always ("bfloat16") or never ("off")."""
    if setting == "auto":
        from ssd.models.precision import cpu_has_native_bf16

        return cpu_has_native_bf16()
    return setting == "bfloat16"


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    # a pure function of the step: a resumed run sees exactly the batches an uninterrupted one does
    out = []
    for j in range(batch_size):
        g = step * batch_size + j
        epoch, pos = divmod(g, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[pos]))
    return out


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
    use_bf16 = train_bf16(cfg.autocast)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
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
        atomic_save({"model": draft.own_state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
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
        loss, kl = loss_fn(draft, [train_ex[i] for i in batch_indices(step, len(train_ex), cfg.batch_size, cfg.seed)],
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
