"""Training examples for draft distillation: the target's own continuations of prompts or `ssd
make-data` shards, the head vocabulary, the teacher's top-k targets over it, and padded batches."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ssd.kv_cache import append_batch



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


def atomic_save(obj, path: Path) -> None:
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
                atomic_save({"key": key, "outputs": done, "seconds": spent}, store)
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
