"""The draft in its own process (its own thread budget), speaking a small pipe protocol.

target -> draft:  ("round", round_id, ops, jit_ids, backups, hit_ids) | ("stop",)
    ops      [(seq_id, "add", (ctx, params)) | (seq_id, "outcome", new_tokens) | (seq_id, "release", None)]
    jit_ids  sequences that missed: draft a speculation just in time and reply at once
    backups  {seq_id: token_ids} speculations the target took from the fast backup
    hit_ids  sequences whose speculation came from the last cache (key = their outcome)
draft -> target:  ("jit", round_id, {seq_id: (token_ids, q_slot | None)}, seconds)   iff jit_ids
                  ("keys", round_id, {seq_id: [(k, token), ...]})   the cached outcomes, right after the fork
                  ("cache", round_id, {seq_id: (keys, token_ids, q_ref | None)} | None, seconds)   always;
                      None when the build was abandoned because the next round message arrived
                      early (the target saw every outcome miss and needs a just-in-time draft now)
                  ("error", message)
Full q rows never travel through the pipe: they are written into shared-memory buffers
(double-buffered by round parity for the cache, one region for JIT) and read by the target.
"""
from __future__ import annotations

import time
import traceback

import torch


def allocate_q_buffers(max_seqs: int, max_branches: int, k: int, vocab_size: int):
    cache_q = torch.empty(2, max_seqs, max_branches, k, vocab_size).share_memory_()
    jit_q = torch.empty(max_seqs, k, vocab_size).share_memory_()
    return cache_q, jit_q


def worker_main(conn, draft_spec: dict, spec_cfg, max_seqs: int, max_model_len: int, threads: int, cache_q, jit_q, seed: int):
    torch.set_num_threads(threads)
    try:
        from ..models.draft import load_draft

        model = load_draft(draft_spec)
        from .draft_runner import DraftRunner

        runner = DraftRunner(model, spec_cfg, max_seqs, max_model_len, seed)
        conn.send(("ready", {"vocab_size": model.cfg.vocab_size, "num_layers": model.cfg.num_layers}))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    entries = {}  # seq_id -> last CacheEntry
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg[0] == "stop":
            return
        try:
            _, round_id, ops, jit_ids, backups, hit_ids = msg
            for seq_id, op, data in ops:
                if op == "add":
                    runner.add(seq_id, data[0], data[1])
                elif op == "outcome":
                    runner.on_outcome(seq_id, data)
                elif op == "release":
                    runner.release(seq_id)
                    entries.pop(seq_id, None)
            specs = {}
            if jit_ids:
                t0 = time.perf_counter()
                drafted = runner.jit(jit_ids, after="miss")
                reply = {}
                for i, (tokens, q) in drafted.items():
                    slot = runner.seqs[i].slot
                    if q is not None:
                        jit_q[slot].copy_(q)
                    reply[i] = (tokens.tolist(), slot if q is not None else None)
                    specs[i] = (tokens.tolist(), "miss")
                conn.send(("jit", round_id, reply, time.perf_counter() - t0))
            for i, tokens in backups.items():
                specs[i] = (list(tokens), "miss")
            for i in hit_ids:
                s = runner.seqs[i]
                entry = entries[i]
                key = (s.last_outcome_k, s.ctx[-1])
                specs[i] = (entry.token_ids[entry.keys[key]].tolist(), "hit")
            t0 = time.perf_counter()
            built = runner.build(
                specs,
                on_keys=lambda keys: conn.send(("keys", round_id, keys)),
                should_abort=lambda: conn.poll(0),
            )
            if built is None:
                for i in specs:
                    entries.pop(i, None)
                conn.send(("cache", round_id, None, time.perf_counter() - t0))
                continue
            parity = round_id % 2
            reply = {}
            for i, entry in built.items():
                entries[i] = entry
                q_ref = None
                if entry.probs is not None:
                    slot = runner.seqs[i].slot
                    cache_q[parity, slot, : entry.probs.shape[0]].copy_(entry.probs)
                    q_ref = (parity, slot)
                reply[i] = (entry.keys, entry.token_ids.tolist(), q_ref)  # lists: tensors would travel as fds
            conn.send(("cache", round_id, reply, time.perf_counter() - t0))
        except Exception:
            conn.send(("error", traceback.format_exc()))
            return
