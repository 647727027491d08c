"""Batch invariance of a loaded model, measured: does a token get the same logits and KV bits
however the engine happens to compute it?

`check_forward_invariance` is the model-level property (used by the tests on the real model):
one sequence is decoded token by token (the AR reference), then the same tokens are recomputed
in verify-sized blocks, inside batches of other sequences of other lengths, and after rollbacks,
and every logits row and KV column is compared bit for bit.

`self_check` is the cheap start-up probe the engines run: the model's own linear weights (one
layer's shapes and the LM head) over every row count of the serving envelope, and the attention
kernel over the same envelope, so a platform where the kernels are not invariant (another CPU,
CUDA, a PyTorch build without oneDNN) is reported instead of assumed.
"""
from __future__ import annotations

import random

import torch

from ssd.kernels.attention import attention
from ssd.kernels.linear import envelope_rows, probe_row_invariance
from ssd.kv_cache import append_batch


def _kv(cache, slot, lo, hi):
    return cache.k[:, slot, :, lo:hi].clone(), cache.v[:, slot, :, lo:hi].clone()


def check_forward_invariance(model, *, prompt_len: int = 40, steps: int = 24, trials: int = 12,
                             max_block: int = 9, max_batch: int = 4, seed: int = 0) -> list[str]:
    """Returns the mismatches found (empty: invariant over the shapes tried)."""
    rng = random.Random(seed)
    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, V, (prompt_len + steps,), generator=g).tolist()
    max_len = prompt_len + steps + max_block + 8
    # reference: prefill, then one token per forward (an AR decode)
    ref_cache = model.new_cache(1, max_len)
    model(torch.tensor([prompt[:prompt_len]]), append_batch([0], [0], prompt_len), ref_cache)
    ref_logits = []
    for i in range(prompt_len, prompt_len + steps):
        out = model(torch.tensor([[prompt[i]]]), append_batch([0], [i], 1), ref_cache)
        ref_logits.append(out[0, 0])
    ref_k, ref_v = _kv(ref_cache, 0, 0, prompt_len + steps)

    failures = []
    for t in range(trials):
        B = rng.randint(1, max_batch)
        row = rng.randrange(B)
        cache = model.new_cache(B, max_len)
        # our sequence: same prefill, then the first `done` tokens one by one
        done = rng.randrange(0, steps - 1)
        model(torch.tensor([prompt[:prompt_len]]), append_batch([row], [0], prompt_len), cache)
        for i in range(prompt_len, prompt_len + done):
            model(torch.tensor([[prompt[i]]]), append_batch([row], [i], 1), cache)
        # neighbours: other sequences with other lengths
        others = [r for r in range(B) if r != row]
        lens = {}
        for r in others:
            L = rng.randint(3, prompt_len + steps)
            ids = torch.randint(0, V, (L,), generator=g)
            model(ids[None], append_batch([r], [0], L), cache)
            lens[r] = L
        start = prompt_len + done
        if rng.random() < 0.4:  # a rejected speculation first: written, then rolled back
            junk = torch.randint(0, V, (1, rng.randint(1, max_block)), generator=g)
            model(junk, append_batch([row], [start], junk.shape[1]), cache)
            cache.truncate(row, start)
        n = rng.randint(1, min(max_block, prompt_len + steps - start))
        counts, ids, lengths = [], [], []
        for r in range(B):
            if r == row:
                feed = prompt[start:start + n]
                lengths.append(start)
            else:
                feed = torch.randint(0, V, (rng.randint(1, max_block),), generator=g).tolist()
                lengths.append(lens[r])
            counts.append(len(feed))
            ids.append(feed)
        width = max(counts)
        x = torch.tensor([f + [0] * (width - len(f)) for f in ids])
        logits = model(x, append_batch(list(range(B)), lengths, counts), cache)
        for j in range(n):
            if not torch.equal(logits[row, j], ref_logits[start - prompt_len + j]):
                failures.append(f"trial {t}: B={B} row={row} block={n} pos={start + j}: logits differ")
                break
        k, v = _kv(cache, row, 0, start + n)
        if not (torch.equal(k, ref_k[..., :start + n, :]) and torch.equal(v, ref_v[..., :start + n, :])):
            failures.append(f"trial {t}: B={B} row={row} block={n}: KV entries differ")
    return failures


def probe_attention(head_dim: int, num_heads: int, num_kv_heads: int, max_rows: int, max_len: int,
                    dtype=torch.float32, device="cpu", seed: int = 0) -> list[str]:
    """One query token computed alone vs as row i of a block of n tokens (n over the row
    envelope), after contexts from a few columns up to max_len."""
    from ssd.kernels.attention import AttnBatch

    g = torch.Generator().manual_seed(seed)
    total = max_len + 1
    k = torch.randn(1, num_kv_heads, total, head_dim, generator=g).to(dtype).to(device)
    v = torch.randn(1, num_kv_heads, total, head_dim, generator=g).to(dtype).to(device)
    q = torch.randn(1, num_heads, total, head_dim, generator=g).to(dtype).to(device)

    def run(start, n):  # tokens start..start+n-1 appended after `start` columns, causal
        kv_len = start + n
        prefix = torch.tensor([start], device=device)
        cols = torch.arange(kv_len, device=device)
        mask = cols[None, None, :] < (prefix[:, None] + torch.arange(1, n + 1, device=device))[:, :, None]
        b = AttnBatch(torch.zeros(1, dtype=torch.long, device=device), None, None, mask, kv_len, prefix)
        return attention(q[:, :, start:start + n], k[:, :, :kv_len], v[:, :, :kv_len], b)

    failures = []
    for start in sorted({0, 63, 300, max(0, max_len - max_rows)}):
        if start >= max_len:
            continue
        alone = run(start, 1)
        for n in envelope_rows(min(max_rows, max_len - start)):
            if not torch.equal(run(start, n)[:, :, :1], alone):
                failures.append(f"attention {dtype}: after {start} columns, the first of {n} tokens differs from the token alone")
                break
    return failures


def self_check(model, max_rows: int, max_len: int) -> dict:
    """The start-up probe. Returns {"invariant": bool, "failures": [...], "rows": max_rows}."""
    layer = model.layers[0]
    weights = [layer.qkv_weight, layer.o_weight, layer.gate_up_weight, layer.down_weight, model.lm_head.weight]
    rows = envelope_rows(max_rows)
    failures = probe_row_invariance(weights, rows, invariant=model.invariant) if model.invariant else ["disabled"]
    if model.invariant:
        c = model.cfg
        failures += probe_attention(c.head_dim, c.num_heads, c.num_kv_heads, max_rows, max_len, model.dtype, model.device)
    return {"invariant": not failures, "failures": failures, "rows": max_rows}
