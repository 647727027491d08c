"""The draft side of SD and SSD, free of any transport: just-in-time drafting and the
speculation-cache construction of Saguaro (glue decode, fork, tree decode).

Used in-process by the SD engine, inside the draft worker process by the SSD engine, and by
the draft gRPC service. Draft KV columns equal logical positions for the committed context;
the tree region of a round lives in the same slot after the glue tokens (no prefix copies).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import SamplingParams, SpeculationConfig
from ..kv_cache import append_batch, tree_step_batch
from ..sampling import process_logits, sample, saguaro_reshape
from ..speculation.fanout import FanOutPlanner

RANKED_CANDIDATES = 16  # candidates per depth kept for the power-law fit (tokens only)


@dataclass
class DraftSeq:
    slot: int
    params: SamplingParams
    generator: torch.Generator | None
    ctx: list[int]
    draft_len: int = 0  # leading ctx tokens whose KV is valid in the draft cache
    # what the last cache was built for (to score its outcome when the next message arrives)
    spec_after: str | None = None  # "hit" | "miss": how the speculation being verified was obtained
    ranked: list[list[int]] | None = None  # [K+1][<=R] fork candidates by rank per depth
    last_outcome_k: int = -1  # accepted tokens of the last verified round (its cache key's k)


@dataclass
class CacheEntry:
    """Speculations for every cached outcome of one sequence's round."""

    keys: dict[tuple[int, int], int]  # (num_accepted k, recovery/bonus token) -> branch index
    token_ids: torch.Tensor  # [num_branches, K] int64
    probs: torch.Tensor | None  # [num_branches, K, Vh] draft q over the head (None when greedy)
    fan_out: list[int] = field(default_factory=list)


class DraftRunner:
    def __init__(self, model, speculation: SpeculationConfig, max_seqs: int, max_model_len: int, seed: int = 0):
        self.model = model
        self.speculation = speculation
        self.K = speculation.num_speculative_tokens
        self.vocab_size = model.cfg.vocab_size
        # reduced-vocabulary head: logits come over head_ids only (q = 0 elsewhere)
        self.head_ids = getattr(model, "head_ids", None)  # [Vh] int64 | None
        # room for the glue tokens and the whole tree region of a round after the context
        self.max_branches = speculation.fan_out_budget
        max_len = max_model_len + self.K + 1 + self.K * self.max_branches
        self.cache = model.new_cache(max_seqs, max_len)
        self.seqs: dict[int, DraftSeq] = {}
        self.planner = FanOutPlanner(
            speculation.fan_out_budget, self.K, speculation.fan_out,
            self.vocab_size if self.head_ids is None else len(self.head_ids), speculation.init_acceptance, speculation.init_power_r
        )
        self.seed = seed

    # ---- sequence life cycle -------------------------------------------------------------
    def add(self, seq_id: int, ctx: list[int], params: SamplingParams) -> None:
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} already known to the draft")
        gen = None
        if not params.greedy:
            gen = torch.Generator().manual_seed((params.seed if params.seed is not None else self.seed) * 7919 + seq_id)
        self.seqs[seq_id] = DraftSeq(self.cache.allocate(), params, gen, list(ctx))

    def release(self, seq_id: int) -> None:
        s = self.seqs.pop(seq_id, None)
        if s is not None:
            self.cache.free(s.slot)

    def advance(self, seq_id: int, new_tokens: list[int]) -> None:
        """The target committed new_tokens (accepted + recovery/bonus) for seq_id."""
        s = self.seqs[seq_id]
        if s.ranked is not None and s.spec_after is not None and new_tokens:
            k = len(new_tokens) - 1
            cands = s.ranked[k] if k < len(s.ranked) else []
            t = new_tokens[-1]
            rank = cands.index(t) if t in cands else RANKED_CANDIDATES
            self.planner.stats[s.spec_after].record_round(self.K, k, rank)
        s.ranked = None
        s.last_outcome_k = len(new_tokens) - 1
        s.ctx.extend(new_tokens)

    # ---- helpers ---------------------------------------------------------------------------
    def _to_vocab(self, idx: torch.Tensor) -> torch.Tensor:
        """Head indices -> token ids."""
        return idx if self.head_ids is None else self.head_ids[idx]

    def _pick(self, s: DraftSeq, logits: torch.Tensor, fan_out):
        """Next draft token per row. logits [N, Vh] -> (tokens [N], q [N, Vh] | None).
        q is the exact (Saguaro-reshaped) distribution the token was sampled from, over the
        head's tokens (head_ids; ssd/speculation/qrows.py widens it to the vocabulary)."""
        if s.params.greedy:
            return self._to_vocab(logits.argmax(-1)), None
        q = saguaro_reshape(process_logits(logits, s.params), torch.as_tensor(fan_out), self.speculation.saguaro_c)
        idx = sample(q, s.generator)
        return self._to_vocab(idx), q

    # ---- just-in-time drafting (SD, and SSD after a miss) ---------------------------------
    @torch.inference_mode()
    def jit(self, seq_ids: list[int], after: str = "miss"):
        """K sequential draft steps for each sequence, batched across sequences.
        Returns {seq_id: (token_ids [K], probs [K, Vh] | None)}, q over the head (head_ids)."""
        if not seq_ids:
            return {}
        rows = [self.seqs[i] for i in seq_ids]
        K = self.K
        fan = self.planner.schedule(after)
        feeds = [r.ctx[r.draft_len :] for r in rows]
        tokens = [[] for _ in rows]
        probs = [[] for _ in rows]
        lengths = [r.draft_len for r in rows]
        for step in range(K):
            n = [len(f) for f in feeds]
            width = max(n)
            ids = torch.tensor([f + [0] * (width - len(f)) for f in feeds], dtype=torch.int64)
            batch = append_batch([r.slot for r in rows], lengths, n, device=ids.device)
            last = torch.tensor([[x - 1] for x in n], dtype=torch.int64)
            logits = self.model(ids, batch, self.cache, logits_rows=last)[:, 0]  # [B, V]
            for b, r in enumerate(rows):
                tok, q = self._pick(r, logits[b : b + 1], fan[step])
                tokens[b].append(int(tok[0]))
                if q is not None:
                    probs[b].append(q[0])
            lengths = [l + x for l, x in zip(lengths, n)]
            feeds = [[t[-1]] for t in tokens]
        out = {}
        for b, (i, r) in enumerate(zip(seq_ids, rows)):
            # ctx + d_1..d_{K-1} hold valid KV (build() re-feeds the last ctx token for G_0)
            r.draft_len = len(r.ctx) + K - 1
            out[i] = (torch.tensor(tokens[b]), torch.stack(probs[b]) if probs[b] else None)
        return out

    # ---- speculation cache construction (SSD) ----------------------------------------------
    @torch.inference_mode()
    def build(self, specs: dict[int, tuple[list[int], str]], on_keys=None, should_abort=None) -> dict[int, CacheEntry] | None:
        """specs: {seq_id: (the K speculated tokens now being verified, "hit" | "miss")}.
        Predicts the round's outcomes and drafts the next speculation for each (Saguaro).
        on_keys({seq_id: [(k, token), ...]}) is called as soon as the fork is known, before the
        tree decode; should_abort() is polled between tree steps: True abandons the build
        (the target learnt that every outcome missed) and returns None."""
        if not specs:
            return {}
        K = self.K
        seq_ids = list(specs)
        rows = [self.seqs[i] for i in seq_ids]
        # 1. glue decode: one forward over (unfed context tail + the K speculated tokens),
        #    giving draft logits G_0..G_K at every possible rejection depth
        feeds, starts = [], []
        for r, i in zip(rows, seq_ids):
            start = min(r.draft_len, len(r.ctx) - 1)
            starts.append(start)
            feeds.append(r.ctx[start:] + list(specs[i][0]))
        n = [len(f) for f in feeds]
        width = max(n)
        ids = torch.tensor([f + [0] * (width - len(f)) for f in feeds], dtype=torch.int64)
        batch = append_batch([r.slot for r in rows], starts, n, device=ids.device)
        glue_rows = torch.tensor([[x - K - 1 + j for j in range(K + 1)] for x in n], dtype=torch.int64)
        glue_logits = self.model(ids, batch, self.cache, logits_rows=glue_rows)  # [B, K+1, V]

        # 2. fork: top-F_k candidates per depth, the drafted token excluded below depth K
        branch_tok, branch_depth, fans = [], [], []
        for b, (r, i) in enumerate(zip(rows, seq_ids)):
            spec_tokens, after = specs[i]
            r.draft_len = len(r.ctx) + K  # context + speculated tokens now hold valid KV
            r.spec_after = after
            fan = self.planner.schedule(after)  # the schedule follows how this speculation arrived
            top_idx = torch.topk(glue_logits[b], min(RANKED_CANDIDATES + 1, glue_logits.shape[-1]), dim=-1).indices
            top = self._to_vocab(top_idx).tolist()  # [K+1][R+1] token ids by draft rank
            ranked = []
            for k in range(K + 1):
                cands = [t for t in top[k] if k == K or t != spec_tokens[k]][:RANKED_CANDIDATES]
                ranked.append(cands)
            toks, depths = [], []
            for k in range(K + 1):
                for t in ranked[k][: fan[k]]:
                    toks.append(t)
                    depths.append(k)
            r.ranked = ranked
            branch_tok.append(toks)
            branch_depth.append(depths)
            fans.append(fan)
        if on_keys is not None:
            on_keys({i: list(zip(branch_depth[b], branch_tok[b])) for b, i in enumerate(seq_ids)})
        # 3. tree decode: K steps, one new token per branch for all rows in one forward each
        nb = [len(t) for t in branch_tok]
        width = max(nb)
        L = [len(r.ctx) for r in rows]
        region = [l + K for l in L]
        visible = [[l + d for d in depths] for l, depths in zip(L, branch_depth)]
        base_pos = visible  # the fork token sits at logical position L + k
        # branch tokens become the next speculation only on a hit: reshape for the hit schedule
        next_fan = self.planner.schedule("hit")
        cur = [list(t) for t in branch_tok]
        out_tok = [[[] for _ in range(x)] for x in nb]
        out_q = [[[] for _ in range(x)] for x in nb]
        for step in range(K):
            if should_abort is not None and should_abort():
                return None
            ids = torch.tensor([c + [0] * (width - len(c)) for c in cur], dtype=torch.int64)
            batch = tree_step_batch([r.slot for r in rows], visible, region, nb, step, base_pos, device=ids.device)
            logits = self.model(ids, batch, self.cache)  # [B, width, V]
            for b, r in enumerate(rows):
                if nb[b] == 0:
                    continue
                tok, q = self._pick(r, logits[b, : nb[b]], next_fan[step])
                tok = tok.tolist()
                for j in range(nb[b]):
                    out_tok[b][j].append(tok[j])
                    if q is not None:
                        out_q[b][j].append(q[j])
                cur[b] = tok
        result = {}
        for b, i in enumerate(seq_ids):
            keys = {(d, t): j for j, (d, t) in enumerate(zip(branch_depth[b], branch_tok[b]))}
            token_ids = torch.tensor(out_tok[b], dtype=torch.int64).reshape(nb[b], K)
            probs = None
            if not rows[b].params.greedy and nb[b]:
                probs = torch.stack([torch.stack(q) for q in out_q[b]])
            result[i] = CacheEntry(keys, token_ids, probs, fans[b])
        return result

    def on_outcome(self, seq_id: int, new_tokens: list[int]) -> None:
        """After build(): the verified round committed new_tokens; only the accepted part of the
        speculation keeps valid KV."""
        s = self.seqs[seq_id]
        s.draft_len = min(s.draft_len, len(s.ctx) + len(new_tokens) - 1)
        self.advance(seq_id, new_tokens)
