"""`ssd make-data`: the target answers real prompts, and what a draft learns from is stored.

For each prompt (ShareGPT first turns and multi-turn contexts, plus a share of the generated
code/math prompts of ssd/train/prompts.py on the training split) the target writes its own
answer with its chat template, greedy or sampled, in batches, in the fast dtype. One forward
over each finished sequence then records, for every position that predicts an answer token,
the target's top-k next-token distribution (token ids and logits), and, with --features, the
residual stream entering layers {2, L/2, L-3} at every position (what a feature drafter reads).

With --answers dataset nothing is decoded: each ShareGPT prompt keeps the conversation's own
reply (ending with the target's end-of-turn token, cut at gen_tokens), and the same forward
scores it. That is off-policy text (not what the target would write) but costs one batched
forward per shard instead of gen_tokens decode steps, so far more positions per hour.

Output: shards of `shard_prompts` prompts (shard-00000.pt, ...) and manifest.json (settings,
shards done, tokens, seconds) in the cache directory, never in git. A run is resumable: the
shards already written are kept, and a larger --max-tokens continues where the last run stopped.
Shards never mix splits, and the held-out split (ShareGPT conversations 15,000 onward) is
only ever written to a directory of its own.
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ssd.train.config import DataConfig

FORMAT_VERSION = 1


def feature_layers(num_layers: int) -> tuple[int, ...]:
    """The layers whose inputs a feature drafter reads: low, middle and high (2, L/2, L-3)."""
    return tuple(sorted({min(2, num_layers - 1), num_layers // 2, max(num_layers - 3, 0)}))


def default_out(target_name: str, split: str) -> Path:
    from ssd.models.loader import cache_root

    return cache_root() / "data" / target_name / f"sharegpt-{split}"


def prompt_list(cfg: DataConfig) -> list[dict]:
    """Every prompt of the run in its fixed order: {"messages", "source", "kind", "answer"} (answer:
    the ShareGPT conversation's own reply, None for generated prompts)."""
    from ssd.train.prompts import build_prompts
    from ssd.train.sharegpt import prompts as sharegpt_prompts

    items = [{"messages": p["messages"], "source": f"sharegpt:{p['conversation']}", "kind": p["kind"],
              "answer": p["answer"]}
             for p in sharegpt_prompts(cfg.split, seed=cfg.seed)]
    if cfg.split == "train" and cfg.generated_share > 0:
        n = int(len(items) * cfg.generated_share / (1 - cfg.generated_share))
        items += [{"messages": [{"role": "user", "content": p["prompt"]}], "source": "generated", "kind": p["category"]}
                  for p in build_prompts(n, cfg.seed)]
    random.Random(cfg.seed).shuffle(items)
    return items


class DataDir:
    """A shard directory: manifest.json + shard-NNNNN.pt."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def manifest(self) -> dict | None:
        return json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else None

    def shard_path(self, i: int) -> Path:
        return self.path / f"shard-{i:05d}.pt"

    def shards(self) -> list[Path]:
        m = self.manifest() or {"shards": []}
        return [self.shard_path(s["index"]) for s in m["shards"]]

    def write_manifest(self, m: dict) -> None:
        tmp = self.manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(m, indent=1))
        tmp.replace(self.manifest_path)


def load_shards(path: str | Path, max_tokens: int | None = None) -> list[dict]:
    """The sequences of a shard directory, in shard order: {"ids" int64 [n], "prompt_len",
    "teacher_idx" int64 [m, k], "teacher_logits" fp32 [m, k] (m = n - prompt_len: position
    prompt_len - 1 + j predicts ids[prompt_len + j]), "sampled", "source", optional "features"}.
    max_tokens: stop after that many answer tokens."""
    out, total = [], 0
    for shard in DataDir(path).shards():
        for seq in torch.load(shard, weights_only=False)["sequences"]:
            out.append(seq)
            total += len(seq["ids"]) - seq["prompt_len"]
            if max_tokens is not None and total >= max_tokens:
                return out
    return out


@torch.no_grad()
def _teacher(target, seqs: list[dict], topk: int, layers: tuple[int, ...], batch_tokens: int = 8192) -> None:
    """Fills each sequence's teacher_idx/teacher_logits (and features) from one full-sequence
    forward of the target per batch of similar lengths."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]["ids"]))
    b0 = 0
    while b0 < len(order):
        b1 = b0 + 1  # ascending lengths: the batch is as wide as its last row
        while b1 < len(order) and (b1 + 1 - b0) * len(seqs[order[b1]]["ids"]) <= batch_tokens:
            b1 += 1
        idx, b0 = order[b0:b1], b1
        n = len(seqs[idx[-1]]["ids"])
        ids = torch.zeros(len(idx), n, dtype=torch.int64)
        for r, i in enumerate(idx):
            ids[r, :len(seqs[i]["ids"])] = seqs[i]["ids"]
        out = target.hidden_full(ids, capture=layers)
        h, feats = (out, []) if not layers else out
        for r, i in enumerate(idx):
            s = seqs[i]
            p, m = s["prompt_len"], len(s["ids"])
            logits = target.lm_head(h[r, p - 1:m - 1]).float()  # [m - p, V]
            vals, top = logits.topk(topk, dim=-1)
            s["teacher_logits"], s["teacher_idx"] = vals.half(), top.int()
            if layers:
                s["features"] = torch.stack([f[r, :m] for f in feats], 0).to(torch.bfloat16)  # [3, m, H]


def dataset_answer(tok, messages: list[dict], reply: str, prompt_ids: list[int], eos: tuple[int, ...],
                   cap: int) -> list[int]:
    """The token ids the target would have to write to give `reply` to `messages`: the chat template
    rendered with the reply, after the prompt's own ids, up to and including the first
    end-of-sequence token (what the target emits to end its turn), cut at `cap` tokens. Where the
    template's rendering does not extend the prompt's ids token for token, the reply's own ids
    plus the first end-of-sequence id."""
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": reply}], add_generation_prompt=False)
    if full[:len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        rest = full[len(prompt_ids):]
        end = next((i for i, t in enumerate(rest) if t in eos), None)
        answer = rest if end is None else rest[:end + 1]
    else:
        answer = tok.encode(reply) + list(eos[:1])
    return answer[:cap]


def make_data(cfg: DataConfig, progress: bool = True) -> dict:
    from ssd.config import EngineConfig, SamplingParams
    from ssd.engine import AREngine
    from ssd.models.loader import DEFAULT_TARGET, load_model, resolve_model
    from ssd.models.precision import resolve_dtype
    from ssd.tokenizer import Tokenizer

    torch.set_num_threads(cfg.threads)
    items = prompt_list(cfg)
    num_shards = (len(items) + cfg.shard_prompts - 1) // cfg.shard_prompts
    if cfg.first_shard >= num_shards:  # before anything is loaded or written
        raise ValueError(f"first_shard {cfg.first_shard} is past the last shard ({num_shards - 1}) of this split")
    target_path = resolve_model(cfg.target)
    name = DEFAULT_TARGET if cfg.target in ("default", DEFAULT_TARGET) else target_path.name
    out = DataDir(cfg.out or default_out(name, cfg.split))
    out.path.mkdir(parents=True, exist_ok=True)
    key = {**cfg.key(), "target": str(target_path), "version": FORMAT_VERSION}
    m = out.manifest()
    if m is not None:  # settings added since a directory was made count with their defaults
        m["key"] = {**{k: v for k, v in dataclasses.asdict(DataConfig(split=cfg.split)).items() if k in key},
                    **m["key"]}
    if m is not None and m["key"] != key:
        raise ValueError(f"{out.path} holds data made with other settings; pick another --out "
                         f"(differs in: {sorted(k for k in key if m['key'].get(k) != key[k])})")
    if m is None:
        m = {"key": key, "shards": [], "tokens": 0, "prompts": 0, "skipped_long": 0, "seconds": 0.0}
    dtype, why = resolve_dtype(cfg.dtype, "cpu")
    target, tcfg = load_model(target_path, dtype=dtype)
    target.invariant = False  # data needs speed, not bit-exact batching
    layers = feature_layers(tcfg.num_layers) if cfg.features else ()
    m["feature_layers"] = list(layers)
    m["dtype"] = str(dtype).removeprefix("torch.")
    tok = Tokenizer(target_path)
    eos = tuple(tcfg.eos_token_ids)
    done = {s["index"] for s in m["shards"]}
    bar = tqdm(total=cfg.max_tokens, initial=min(m["tokens"], cfg.max_tokens), unit="tok", disable=not progress,
               desc=f"make-data {cfg.split} ({m['dtype']})", smoothing=0.05, mininterval=2.0)
    max_len = cfg.max_prompt_tokens + cfg.gen_tokens + 8
    engine = None if cfg.answers == "dataset" else AREngine(  # dataset replies are scored, never decoded
        EngineConfig(mode="ar", max_batch=cfg.gen_batch, max_model_len=max_len, target_threads=cfg.threads),
        target, eos)
    for shard in range(cfg.first_shard, num_shards):
        if m["tokens"] >= cfg.max_tokens:
            break
        if shard in done:
            continue
        t0 = time.perf_counter()
        rng = random.Random(cfg.seed * 1_000_003 + shard)
        chunk = items[shard * cfg.shard_prompts:(shard + 1) * cfg.shard_prompts]
        seqs, reqs, skipped, unanswered = [], [], 0, 0
        produced = 0
        for j, item in enumerate(chunk):
            ids = tok.apply_chat_template(item["messages"])
            if len(ids) > cfg.max_prompt_tokens:
                skipped += 1
                continue
            if cfg.answers == "dataset":  # the conversation's own reply, scored by the target below
                if item.get("answer") is None:
                    unanswered += 1
                    continue
                answer = dataset_answer(tok, item["messages"], item["answer"], ids, eos, cfg.gen_tokens)
                seqs.append({"prompt_len": len(ids), "sampled": False, "answer_from": "dataset",
                             "source": item["source"], "kind": item["kind"],
                             "ids": torch.tensor(ids + answer, dtype=torch.int32)})
                produced += len(answer)
                bar.update(len(answer))
                continue
            sampled = rng.random() < cfg.sampled_share
            params = (SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.gen_tokens,
                                     seed=shard * 100_000 + j) if sampled else SamplingParams(max_tokens=cfg.gen_tokens))
            reqs.append(engine.add_request(ids, params))
            seqs.append({"prompt_len": len(ids), "sampled": sampled, "source": item["source"], "kind": item["kind"]})
        while engine is not None and engine.has_unfinished():
            for _, kept in engine.step():
                produced += len(kept)
                bar.update(len(kept))
            bar.set_postfix_str(f"shard {shard + 1}/{num_shards}, "
                                f"{(m['tokens'] + produced) / max(m['seconds'] + time.perf_counter() - t0, 1e-9):.0f} tok/s")
        for s, r in zip(seqs, reqs):  # the target's own answers (none with --answers dataset)
            s["ids"] = torch.tensor(list(r.prompt_ids) + list(r.output_ids), dtype=torch.int32)
        seqs = [s for s in seqs if len(s["ids"]) > s["prompt_len"]]
        _teacher(target, seqs, cfg.teacher_topk, layers)
        tokens = sum(len(s["ids"]) - s["prompt_len"] for s in seqs)
        tmp = out.shard_path(shard).with_suffix(".pt.tmp")
        torch.save({"sequences": seqs, "version": FORMAT_VERSION}, tmp)
        tmp.replace(out.shard_path(shard))
        spent = time.perf_counter() - t0
        m["shards"].append({"index": shard, "sequences": len(seqs), "tokens": tokens, "seconds": round(spent, 2)})
        m["tokens"] += tokens
        m["prompts"] += len(chunk)
        m["skipped_long"] += skipped
        m["unanswered"] = m.get("unanswered", 0) + unanswered
        m["seconds"] = round(m["seconds"] + spent, 2)
        m["tokens_per_s"] = round(m["tokens"] / max(m["seconds"], 1e-9), 1)
        out.write_manifest(m)
    bar.close()
    m["out"] = str(out.path)
    m["complete"] = m["tokens"] >= cfg.max_tokens or len(m["shards"]) == num_shards - cfg.first_shard
    out.write_manifest(m)
    return m


def report(m: dict) -> None:
    """The one line `ssd make-data` prints when it stops."""
    print(f"{m['out']}: {len(m['shards'])} shards, {m['tokens']} answer tokens from {m['prompts']} prompts "
          f"({m['skipped_long']} over the prompt limit skipped), {m['tokens_per_s']} tok/s, "
          f"{'complete' if m['complete'] else 'stopped early: run again to continue'}")
