"""The draft side of SD and SSD, free of any transport: just-in-time drafting and the
speculation-cache construction of Saguaro (glue decode, fork, tree decode).

Used in-process by the SD engine, inside the draft worker process by the SSD engine, and by
the draft gRPC service. Draft KV columns equal logical positions for the committed context;
the tree region of a round lives in the same slot after the glue tokens (no prefix copies).

A feature drafter (ssd/models/feature_draft.py) also reads, at each position p, a feature of
position p-1: the target's (true) for every committed position but the last, which arrive with
AddSequence/Advance, or its own output h there (self-fed) for everything after. The runner keeps
per sequence the input feature of every position (DraftSeq.gin) and, for each speculation it
produced, the outputs h it drafted it with (DraftSeq.selfh), so the glue decode of the next round
feeds those speculated positions in one forward. When true features arrive for positions that
were fed self-fed, their KV is recomputed (draft_len is cut back to them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..config import SamplingParams, SpeculationConfig
from ..kv_cache import append_batch, tree_step_batch
from ..sampling import position_noise, process_logits, sample, saguaro_reshape
from ..speculation.fanout import FanOutPlanner

RANKED_CANDIDATES = 16  # candidates per depth kept for the power-law fit (tokens only)


class Verifying(NamedTuple):
    """A speculation the target is verifying this round, as the draft builds the next ones on it:
    its tokens (K, or fewer from an adaptive JIT draft) and how it was found, "hit" (from this
    draft's cache) or "miss" (drafted just in time, the backup or the index): the fan-out
    schedule follows it."""

    tokens: list[int]
    after: str


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
    gin: torch.Tensor | None = None  # feature drafters: [max_len, H] the feature each position reads (of its predecessor)
    selfh: dict = field(default_factory=dict)  # (start position, last context token, tokens) -> [K, H] self-fed inputs
    noise: dict = field(default_factory=dict)  # seeded requests: position -> the race's Exp(1) variates [Vh]


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
        self.feature = getattr(model, "kind", None) == "feature"
        self.feature_layers = tuple(model.feature_layers) if self.feature else ()
        self.max_len = max_len

    # ---- sequence life cycle -------------------------------------------------------------
    def add(self, seq_id: int, ctx: list[int], params: SamplingParams, features=None) -> None:
        """features: a feature drafter's true features of ctx[:-1] ([len(ctx) - 1, F]; a tensor or
        protocol.Features); refused when missing or of the wrong size."""
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} already known to the draft")
        gin = None
        if self.feature:
            gin = torch.zeros(self.max_len, self.model.cfg.hidden_size, dtype=self.model.dtype)
            self._true_features(gin, 0, features, len(ctx) - 1)
        gen = None
        if not params.greedy:
            # a request's seed alone fixes its draft stream (not the id the target happened to give it)
            mix = params.seed * 7919 + 1 if params.seed is not None else self.seed * 7919 + seq_id
            gen = torch.Generator().manual_seed(mix % (1 << 64))
        self.seqs[seq_id] = DraftSeq(self.cache.allocate(), params, gen, list(ctx), gin=gin)

    @torch.inference_mode()
    def _true_features(self, gin: torch.Tensor, start: int, features, rows: int) -> None:
        """The target's features of positions start .. start+rows-1 become the inputs of the
        positions after them."""
        if features is None:
            raise ValueError("this draft reads the target's features: the target sent none "
                             f"(it must capture layers {self.feature_layers})")
        f = features.tensor() if hasattr(features, "tensor") else torch.as_tensor(features)
        if tuple(f.shape) != (rows, self.model.feature_size):
            raise ValueError(f"features of shape {tuple(f.shape)}; expected {(rows, self.model.feature_size)}")
        if rows:
            gin[start + 1:start + 1 + rows] = self.model.project(f)

    def release(self, seq_id: int) -> None:
        s = self.seqs.pop(seq_id, None)
        if s is not None:
            self.cache.free(s.slot)

    def advance(self, seq_id: int, new_tokens: list[int], features=None) -> None:
        """The target committed new_tokens (accepted + recovery/bonus) for seq_id; a feature
        drafter also gets the target's features of the positions from the previous last token
        up to the one before the new last ([len(new_tokens), F])."""
        s = self.seqs[seq_id]
        if self.feature and new_tokens:
            last = len(s.ctx) - 1
            self._true_features(s.gin, last, features, len(new_tokens))
            s.draft_len = min(s.draft_len, last + 1)  # positions fed self-fed are fed again, true
        if s.ranked is not None and s.spec_after is not None and new_tokens:
            k = len(new_tokens) - 1
            cands = s.ranked[k] if k < len(s.ranked) else []
            t = new_tokens[-1]
            rank = cands.index(t) if t in cands else RANKED_CANDIDATES
            self.planner.stats[s.spec_after].record_round(len(s.ranked) - 1, k, rank)  # tokens it drafted
        s.ranked = None
        s.last_outcome_k = len(new_tokens) - 1
        s.ctx.extend(new_tokens)

    # ---- helpers ---------------------------------------------------------------------------
    def _forward(self, ids, gprev, batch, logits_rows=None):
        """One draft forward -> (logits, h | None); gprev [B, n, H] only for a feature drafter."""
        if self.feature:
            return self.model(ids, gprev, batch, self.cache, logits_rows=logits_rows)
        return self.model(ids, batch, self.cache, logits_rows=logits_rows), None

    def _gprev(self, rows, starts, n, width, extra=None):
        """[B, width, H]: the input features of positions starts[b] .. starts[b]+n[b]-1 from each
        row's gin, the positions past its context taken from extra[b] ([m, H]) when given."""
        if not self.feature:
            return None
        out = torch.zeros(len(rows), width, self.model.cfg.hidden_size, dtype=self.model.dtype)
        for b, r in enumerate(rows):
            own = min(n[b], len(r.ctx) - starts[b])
            out[b, :own] = r.gin[starts[b]:starts[b] + own]
            if extra is not None and n[b] > own:
                out[b, own:n[b]] = extra[b][:n[b] - own]
        return out

    def _selfh_key(self, r: DraftSeq, tokens) -> tuple:
        return (len(r.ctx), r.ctx[-1], tuple(int(t) for t in tokens))

    def cut_speculation(self, seq_id: int, tokens: list[int], m: int) -> list[int]:
        """The target verifies only tokens[:m] of a cached speculation (adaptive SSD): a feature
        drafter's self-fed inputs for it are kept for that prefix. -> tokens[:m]"""
        r = self.seqs[seq_id]
        h = r.selfh.pop(self._selfh_key(r, tokens), None)
        if h is not None:
            r.selfh[self._selfh_key(r, tokens[:m])] = h[:m]
        return tokens[:m]

    def _to_vocab(self, idx: torch.Tensor) -> torch.Tensor:
        """Head indices -> token ids."""
        return idx if self.head_ids is None else self.head_ids[idx]

    def _pick(self, s: DraftSeq, logits: torch.Tensor, fan_out, positions):
        """Next draft token per row. logits [N, Vh] -> (tokens [N], q [N, Vh] | None).
        q is the exact (Saguaro-reshaped) distribution the token was sampled from, over the
        head's tokens (head_ids; ssd/speculation/qrows.py widens it to the vocabulary); None
        when greedy or seeded (neither verification reads it).
        positions[n]: the context position of row n's token. A seeded request's target draws
        each token by an exponential race fixed by (seed, position) (docs/algorithm.md section
        5b); the draft runs the same race over its own q, which is what makes its proposals
        agree with the target's choices."""
        if s.params.greedy:
            return self._to_vocab(logits.argmax(-1)), None
        if s.params.seed is not None:  # coupled verification reads no q: none is kept or sent
            q = process_logits(logits, s.params)
            return self._to_vocab((q / self._noise(s, positions)).argmax(-1)), None
        q = saguaro_reshape(process_logits(logits, s.params), torch.as_tensor(fan_out), self.speculation.saguaro_c)
        idx = sample(q, s.generator)
        return self._to_vocab(idx), q

    def _noise(self, s: DraftSeq, positions) -> torch.Tensor:
        """The seeded race's Exp(1) variates [N, Vh] at these positions, over the head's tokens
        (the target draws them over the vocabulary; the head sees its own columns)."""
        positions = [int(j) for j in positions]
        for j in set(positions) - s.noise.keys():  # positions repeat across branches and calls
            e = position_noise(s.params.seed, [j], self.vocab_size)[0]
            s.noise[j] = e if self.head_ids is None else e[self.head_ids]
        if len(s.noise) > 8 * (self.K + 1):  # positions behind the context are never drawn again
            for j in [j for j in s.noise if j < len(s.ctx)]:
                del s.noise[j]
        return torch.stack([s.noise[j] for j in positions])

    def _ranking(self, s: DraftSeq, logits: torch.Tensor, positions) -> torch.Tensor:
        """Scores [N, Vh] that order a row's fork candidates: the draft's logits, or for a seeded
        request its race (q / E), whose runners-up are the likeliest recovery tokens."""
        if s.params.greedy or s.params.seed is None:
            return logits
        return process_logits(logits, s.params) / self._noise(s, positions)

    # ---- just-in-time drafting (SD, and SSD after a miss) ---------------------------------
    @torch.inference_mode()
    def jit(self, seq_ids: list[int], after: str = "miss", lengths: dict[int, int] | None = None):
        """Up to K sequential draft steps for each sequence, batched across sequences.
        lengths: {seq_id: most tokens to draft} (adaptive K; K when absent). A row also stops
        early, after its first token, when the draft's top probability at the next position is
        below p_min (docs/algorithm.md section 7a): decided before that token is drawn, so the
        tokens drafted keep exactly the q they were drawn from.
        Returns {seq_id: (token_ids [n], probs [n, Vh] | None)}, n <= K, q over the head (head_ids)."""
        if not seq_ids:
            return {}
        rows = [self.seqs[i] for i in seq_ids]
        limit = [min(max((lengths or {}).get(i, self.K), 1), self.K) for i in seq_ids]
        p_min = self.speculation.p_min
        fan = self.planner.schedule(after)
        feeds = [r.ctx[r.draft_len :] for r in rows]
        tokens = [[] for _ in rows]
        probs = [[] for _ in rows]
        hs = [[] for _ in rows]  # feature drafter: the output h each proposal was drafted from
        lengths_fed = [r.draft_len for r in rows]
        active = list(range(len(rows)))
        for step in range(self.K):
            active = [b for b in active if len(tokens[b]) < limit[b]]
            if not active:
                break
            n = [len(feeds[b]) for b in active]
            width = max(n)
            ids = torch.tensor([feeds[b] + [0] * (width - len(feeds[b])) for b in active], dtype=torch.int64)
            batch = append_batch([rows[b].slot for b in active], [lengths_fed[b] for b in active], n, device=ids.device)
            last = torch.tensor([[x - 1] for x in n], dtype=torch.int64)
            # step 0 feeds context (true features); later steps feed a proposal, self-fed
            gprev = self._gprev([rows[b] for b in active], [lengths_fed[b] for b in active], n, width,
                                [hs[b][-1][None] for b in active] if step and self.feature else None)
            logits, h = self._forward(ids, gprev, batch, logits_rows=last)
            logits = logits[:, 0]  # [B, V]
            stopped = set()
            for a, b in enumerate(active):
                r = rows[b]
                lengths_fed[b] += n[a]
                if step and p_min > 0 and self._confidence(r, logits[a : a + 1]) < p_min:
                    stopped.add(b)  # not drawn: the speculation ends with the tokens drawn so far
                    continue
                tok, q = self._pick(r, logits[a : a + 1], fan[step], [len(r.ctx) + step])
                tokens[b].append(int(tok[0]))
                if q is not None:
                    probs[b].append(q[0])
                if h is not None:
                    hs[b].append(h[a, n[a] - 1])
                feeds[b] = [tokens[b][-1]]
            active = [b for b in active if b not in stopped]
        out = {}
        for b, (i, r) in enumerate(zip(seq_ids, rows)):
            # ctx + d_1..d_{n-1} hold valid KV (build() re-feeds the last ctx token for G_0)
            r.draft_len = len(r.ctx) + len(tokens[b]) - 1
            if self.feature:
                r.selfh = {self._selfh_key(r, tokens[b]): torch.stack(hs[b])}
            out[i] = (torch.tensor(tokens[b]), torch.stack(probs[b]) if probs[b] else None)
        return out

    def _confidence(self, s: DraftSeq, logits: torch.Tensor) -> float:
        """The draft's top probability for a row's next position ([1, Vh] logits): of its own
        (temperature, top-k/p) distribution when sampling, of softmax(logits) when greedy."""
        if s.params.greedy:
            return float(torch.softmax(logits.float(), -1).max())
        return float(process_logits(logits, s.params).max())

    @torch.inference_mode()
    def _selffed_chain(self, rows: list[DraftSeq], specs: list[list[int]]) -> list[torch.Tensor]:
        """A feature drafter's self-fed inputs for speculations it did not draft itself (the
        fast backup's, the index's, another draft's): the context and then the speculated tokens
        one at a time, each reading the previous output. All specs of one length. -> per row [len, H]"""
        K = len(specs[0])
        starts = [min(r.draft_len, len(r.ctx) - 1) for r in rows]
        feeds = [r.ctx[st:] for r, st in zip(rows, starts)]
        hs = [[] for _ in rows]
        for step in range(K):
            n = [len(f) for f in feeds]
            width = max(n)
            ids = torch.tensor([f + [0] * (width - len(f)) for f in feeds], dtype=torch.int64)
            batch = append_batch([r.slot for r in rows], starts, n, device=ids.device)
            gprev = self._gprev(rows, starts, n, width, [h[-1][None] for h in hs] if step else None)
            _, h = self._forward(ids, gprev, batch, logits_rows=torch.tensor([[x - 1] for x in n]))
            for b in range(len(rows)):
                hs[b].append(h[b, n[b] - 1])
            starts = [st + x for st, x in zip(starts, n)]
            feeds = [[sp[step]] for sp in specs]
        return [torch.stack(h) for h in hs]

    # ---- speculation cache construction (SSD) ----------------------------------------------
    @torch.inference_mode()
    def build(self, specs: dict[int, Verifying], on_keys=None, should_abort=None) -> dict[int, CacheEntry] | None:
        """specs: {seq_id: the speculation now being verified}. Every branch drafts K tokens
        whatever its length.
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
        selfh = None
        if self.feature:  # the speculated positions read the outputs they were drafted from
            selfh = [r.selfh.get(self._selfh_key(r, specs[i].tokens)) for r, i in zip(rows, seq_ids)]
            missing = [b for b, h in enumerate(selfh) if h is None]
            for m in sorted({len(specs[seq_ids[b]].tokens) for b in missing}):  # one chain per length
                group = [b for b in missing if len(specs[seq_ids[b]].tokens) == m]
                for b, h in zip(group, self._selffed_chain([rows[b] for b in group],
                                                           [list(specs[seq_ids[b]].tokens) for b in group])):
                    selfh[b] = h
        feeds, starts = [], []
        for r, i in zip(rows, seq_ids):
            start = min(r.draft_len, len(r.ctx) - 1)
            starts.append(start)
            feeds.append(r.ctx[start:] + list(specs[i].tokens))
        n = [len(f) for f in feeds]
        width = max(n)
        ids = torch.tensor([f + [0] * (width - len(f)) for f in feeds], dtype=torch.int64)
        batch = append_batch([r.slot for r in rows], starts, n, device=ids.device)
        m = [len(specs[i].tokens) for i in seq_ids]  # speculated tokens per row (<= K)
        # row b's G_0..G_{m_b} (repeating its last one up to K+1 columns)
        glue_rows = torch.tensor([[x - mb - 1 + min(j, mb) for j in range(K + 1)] for x, mb in zip(n, m)], dtype=torch.int64)
        glue_logits, glue_h = self._forward(ids, self._gprev(rows, starts, n, width, selfh), batch,
                                            logits_rows=glue_rows)  # [B, K+1, V], [B, width, H]

        # 2. fork: top-F_k candidates per depth, the drafted token excluded below depth K
        branch_tok, branch_depth, fans = [], [], []
        for b, (r, i) in enumerate(zip(rows, seq_ids)):
            spec_tokens, after = specs[i].tokens, specs[i].after
            mb = m[b]
            r.draft_len = len(r.ctx) + mb  # context + speculated tokens now hold valid KV
            r.spec_after = after
            fan = self.planner.schedule(after, mb)  # the schedule follows how this speculation arrived
            scores = self._ranking(r, glue_logits[b, : mb + 1], range(len(r.ctx), len(r.ctx) + mb + 1))
            top_idx = torch.topk(scores, min(RANKED_CANDIDATES + 1, glue_logits.shape[-1]), dim=-1).indices
            top = self._to_vocab(top_idx).tolist()  # [m+1][R+1] token ids by draft rank
            ranked = []
            for k in range(mb + 1):
                cands = [t for t in top[k] if k == mb or t != spec_tokens[k]][:RANKED_CANDIDATES]
                ranked.append(cands)
            toks, depths = [], []
            for k in range(mb + 1):
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
        region = [l + K for l in L]  # after the longest glue (a shorter one leaves unseen columns)
        visible = [[l + d for d in depths] for l, depths in zip(L, branch_depth)]
        base_pos = visible  # the fork token sits at logical position L + k
        # branch tokens become the next speculation only on a hit: reshape for the hit schedule
        next_fan = self.planner.schedule("hit")
        cur = [list(t) for t in branch_tok]
        out_tok = [[[] for _ in range(x)] for x in nb]
        out_q = [[[] for _ in range(x)] for x in nb]
        tree_g, tree_h = None, []
        if self.feature:  # a fork token at depth k reads the glue's output at the position before it
            tree_g = torch.zeros(len(rows), width, self.model.cfg.hidden_size, dtype=self.model.dtype)
            for b in range(len(rows)):
                for j, d in enumerate(branch_depth[b]):
                    tree_g[b, j] = glue_h[b, n[b] - m[b] - 1 + d]
        for step in range(K):
            if should_abort is not None and should_abort():
                return None
            ids = torch.tensor([c + [0] * (width - len(c)) for c in cur], dtype=torch.int64)
            batch = tree_step_batch([r.slot for r in rows], visible, region, nb, step, base_pos, device=ids.device)
            logits, h = self._forward(ids, tree_g, batch)  # [B, width, V]
            if h is not None:
                tree_h.append(h)
                tree_g = h  # each branch's next token reads this step's output
            for b, r in enumerate(rows):
                if nb[b] == 0:
                    continue
                # branch j forks at depth d (position L + d): this step drafts position L + d + 1 + step
                tok, q = self._pick(r, logits[b, : nb[b]], next_fan[step], [L[b] + d + 1 + step for d in branch_depth[b]])
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
            if nb[b] and out_q[b][0]:  # sampled by the ratio test (greedy and seeded keep no q)
                probs = torch.stack([torch.stack(q) for q in out_q[b]])
            result[i] = CacheEntry(keys, token_ids, probs, fans[b])
            if self.feature:  # a branch that hits is the next speculation: keep what it was drafted from
                hb = torch.stack([th[b, :nb[b]] for th in tree_h], 1) if nb[b] else None  # [nb, K, H]
                r = rows[b]
                r.selfh = {(len(r.ctx) + d + 1, t, tuple(out_tok[b][j])): hb[j]
                           for j, (d, t) in enumerate(zip(branch_depth[b], branch_tok[b]))}
        return result

    def on_outcome(self, seq_id: int, new_tokens: list[int], features=None) -> None:
        """After build(): the verified round committed new_tokens; only the accepted part of the
        speculation keeps valid KV."""
        s = self.seqs[seq_id]
        s.draft_len = min(s.draft_len, len(s.ctx) + len(new_tokens) - 1)
        self.advance(seq_id, new_tokens, features)
