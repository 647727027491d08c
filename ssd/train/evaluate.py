"""Evaluate a draft on held-out examples: top-1 agreement with the target (overall and by position
in the answer), KL over the draft's head, and the offline n-alpha acceptance curve; and, as a
command, a whole draft directory (standalone or feature drafter) on held-out `ssd make-data` shards.

    python -m ssd.train.evaluate DRAFT_DIR [--data DIR] [--positions 256] [--target default]

DIR defaults to the held-out ShareGPT shards of the default target in the cache directory.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ssd.train.draft_model import DraftModel
from ssd.train.examples import Example, collate
from ssd.train.objective import distill_loss


ANSWER_BINS = ((16, "1-16"), (64, "17-64"), (None, "65+"))  # (last answer position, label); 1 = its first token


def answer_bin(pos: int) -> str:
    return next(label for hi, label in ANSWER_BINS if hi is None or pos <= hi)


@torch.no_grad()
def evaluate(draft: DraftModel, examples: list[Example], batch_size: int = 8) -> dict:
    """Held-out greedy top-1 agreement with the target on its continuation positions (position
    t predicts ids[t+1], the target's greedy token there): the per-token acceptance proxy.
    Also by position in the answer: a bench of short answers reads only their openings, where
    agreement is lower than over whole answers (docs/results/draft-training-journal-to-2026-12-05.md)."""
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
                b = by_pos.setdefault(answer_bin(t - e.prompt_len + 2), [0, 0])
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


def evaluate_draft_dir(draft_dir: str | Path, target_path: str | Path, data_dir: str | Path, positions: int = 256,
                       seq_len: int = 512) -> dict:
    from ssd.models.loader import read_config
    from ssd.train.data import DataDir, load_shards
    from ssd.train.examples import examples_from_shards
    from ssd.train.draft_io import load_trainable

    from ssd.models.feature_draft import is_feature_dir

    m = DataDir(data_dir).manifest()
    if m is None or m["key"]["split"] != "heldout":
        raise ValueError(f"{data_dir} holds no held-out `ssd make-data` shards")
    if is_feature_dir(draft_dir):
        return _evaluate_feature_dir(draft_dir, target_path, data_dir, m, positions, seq_len)
    draft = load_trainable(draft_dir, target_path)
    ex = examples_from_shards(load_shards(data_dir), draft.head_token_ids, read_config(target_path).vocab_size, seq_len)
    out = {"draft": str(draft_dir), "data": str(data_dir), "sequences": len(ex)}
    out.update(evaluate(draft, ex))
    out["acceptance_curve"] = acceptance_curve(draft, ex, positions=positions)
    return out


def _evaluate_feature_dir(draft_dir, target_path, data_dir, manifest: dict, positions: int, seq_len: int) -> dict:
    """A feature drafter: agreement at self-fed depth 0..7 and the n-alpha curves with 0 and 5
    self-fed context positions (SD's case, and SSD's at K = 4)."""
    from ssd.models.feature_draft import load_feature_dir
    from ssd.models.loader import read_config
    from ssd.train.data import load_shards
    from ssd.train.examples import examples_from_shards
    from ssd.train.feature_train import evaluate_feature, feature_acceptance_curve

    if not manifest.get("feature_layers"):
        raise ValueError(f"{data_dir} was made without --features; a feature drafter needs them")
    draft = load_feature_dir(draft_dir, target_path)
    draft.invariant = False
    ex = examples_from_shards(load_shards(data_dir), draft.head_ids, read_config(target_path).vocab_size, seq_len,
                              with_features=True)
    out = {"draft": str(draft_dir), "data": str(data_dir), "sequences": len(ex)}
    out.update(evaluate_feature(draft, ex))
    out["acceptance_curve"] = feature_acceptance_curve(draft, ex, positions=positions)
    out["acceptance_curve_ssd"] = feature_acceptance_curve(draft, ex, positions=positions, prefix_selffed=5)
    return out


def main(argv=None) -> int:
    from ssd.models.loader import DEFAULT_TARGET, resolve_model
    from ssd.train.data import default_out

    ap = argparse.ArgumentParser(prog="python -m ssd.train.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("draft")
    ap.add_argument("--target", default="default")
    ap.add_argument("--data", default="")
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ns = ap.parse_args(argv)
    torch.set_num_threads(ns.threads)
    target = resolve_model(ns.target)
    data = ns.data or default_out(DEFAULT_TARGET if ns.target == "default" else target.name, "heldout")
    print(json.dumps(evaluate_draft_dir(ns.draft, target, data, ns.positions), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
