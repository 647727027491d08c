"""Speculative speculative decoding (Saguaro) with the draft in its own process.

While the target verifies round r, the draft predicts the round's outcomes and drafts the next
speculation for each (the speculation cache). When verification ends the target looks its
outcome up: a hit starts round r+1 at once; a miss falls back to the primary draft just in
time (batch below b*) or to the prompt-lookup backup (batch at or above b*).
"""
from __future__ import annotations

import logging
import time

import torch

from ..config import EngineConfig, Mode
from ..models.draft import DraftDescription
from ..speculation import ngram
from ..speculation.adaptive import AdaptiveK, Ewma, SpeculationGate, next_budget, prefer_jit
from ..speculation.index import GREEDY, LocalIndex, branch_items, context_key, draft_fingerprint
from .base import Engine, RoundRow, StepRecord
from .draft_link import DraftUnavailable, ProcessDraftLink
from .sequence import Proposal, Source
from .protocol import AddSequence, Advance, CacheKeys, CacheReply, JitReply, Release, RoundRequest, SequenceOp


log = logging.getLogger(__name__)


class SSDEngine(Engine):
    mode = "ssd"

    def __init__(self, cfg: EngineConfig, target_model, draft_desc: DraftDescription | None, eos_token_ids, seed: int = 0,
                 start_timeout: float = 300.0, link=None, index=None):
        super().__init__(cfg, target_model, eos_token_ids)
        self.index = index if index is not None else LocalIndex(ttl_s=cfg.index_ttl_s)
        self.published: dict[int, list[str]] = {}  # seq_id -> index keys it stored
        self.link = link or ProcessDraftLink(draft_desc, cfg.speculation, cfg.max_batch, cfg.max_model_len, cfg.draft_threads,
                                             seed, start_timeout)
        self.draft_alive = True
        self.draft_error: str | None = None
        self.draft_timeout_s = 60.0  # longest wait for one draft reply (a cache build under load included)
        self.round_id = 0
        self.pending_ops: list[SequenceOp] = []
        self.stale_rounds: set[int] = set()  # rounds whose cache we stopped waiting for
        # this step asked the draft for some speculation, so its round went to the draft (a step that
        # asks nothing sends nothing)
        self.round_wants_cache = False
        # speculations of different drafts (or draft settings) must never meet in the index; a
        # draft service names its own fingerprint (and publishes itself when it has the index)
        self.draft_fingerprint = self.link.info.fingerprint or draft_fingerprint(
            self.link.info.model or (draft_desc.path if draft_desc is not None else None), cfg.speculation)
        # the draft's own publishing helps only when both sides share the index (Redis); with the
        # in-process map the target stores what it receives itself
        self.draft_publishes = self.link.info.publishes and not isinstance(self.index, LocalIndex)
        self.target.capture = tuple(self.link.info.feature_layers)  # a feature drafter's layers
        spec = cfg.speculation
        # adaptive speculation (docs/algorithm.md section 7); None: K, b* and the budget stay fixed
        self.adaptive = AdaptiveK(self.K, spec.init_acceptance, gate=SpeculationGate() if spec.gate else None) \
            if spec.adaptive else None
        if self.adaptive is not None and not self.link.carries_adaptive:
            raise ValueError(f"adaptive speculation needs a draft link that carries per-round K and budgets; "
                             f"{type(self.link).__name__} does not")
        self.budget = spec.fan_out_budget  # this round's fan-out budget (adaptive: moves within [1, fan_out_budget])
        self.jit_wait = Ewma()  # seconds the target waits for one JIT reply
        self.verify_wait = Ewma()  # seconds of one verify step
        self.fallback_decisions = 0  # measured JIT-or-backup decisions taken (section 7b)
        self.last_fallback_was_backup = False
        self.arm, self.jit_k = None, {}  # this step's gate arm and key, and its JIT lengths
        if self.link.info.vocab_size != self.vocab_size:
            raise ValueError(f"draft vocabulary {self.link.info.vocab_size} != target vocabulary {self.vocab_size}")

    # ---- transport -----------------------------------------------------------------------------
    def _recv_kind(self, kind: type, round_id: int):
        """The next reply of this kind for this round, skipping the replies of abandoned rounds."""
        while True:
            msg = self.link.recv(timeout=self.draft_timeout_s)  # a hung draft counts as lost
            if isinstance(msg, kind) and msg.round_id == round_id:
                return msg
            if isinstance(msg, (CacheKeys, CacheReply)) and (msg.round_id in self.stale_rounds or msg.round_id < round_id):
                if isinstance(msg, CacheReply):
                    self.stale_rounds.discard(msg.round_id)
                continue
            raise DraftUnavailable(f"draft protocol error: expected {kind.__name__} for round {round_id}, "
                                   f"got {type(msg).__name__} for {getattr(msg, 'round_id', None)}")

    def _draft_lost(self, err: Exception) -> None:
        """A dead draft never changes the output nor stalls a sequence; from now on
        every speculation comes from the fast backup."""
        log.warning("draft lost, continuing with the fast backup: %s", err)
        self.draft_error = str(err)
        self.draft_alive = False
        for s in self.scheduler.running:
            if s.speculation is not None and s.speculation.source != Source.BACKUP:
                s.speculation = None

    def _maybe_revive(self) -> None:
        """A draft that came back (a restarted pod, a new replica) takes over again: it is told
        every running sequence's context and builds caches from the next round on."""
        if self.draft_alive or not self.link.revive():  # revive() never blocks
            return
        log.info("draft back (%s): speculating again", ", ".join(self.link.info.drafts) or "its own draft")
        self.draft_alive, self.draft_error = True, None
        self.stale_rounds.clear()
        self.pending_ops = [AddSequence(s.seq_id, list(s.context), s.params, s.options, self._all_features(s))
                            for s in self.scheduler.running if not s.finished and _mode(s) != Mode.AR]

    def close(self) -> None:
        self.link.close()

    def _all_features(self, s):
        from .protocol import Features

        return Features.of(s.all_features()) if self.target.capture else None

    # ---- one step: schedule, run, postprocess -------------------------------------------------
    def step(self):
        """One batched round for every running sequence: admit, make sure every sequence has a
        speculation (cache, index, JIT draft or fast backup), verify them all in one target
        forward, commit the outcomes, then take the next speculations from the draft's cache."""
        if self.adaptive is not None:  # the previous step's period ends here (the gate measures it)
            self.adaptive.step_begins(time.perf_counter())
        self._maybe_revive()
        events = self._admit()
        running = list(self.scheduler.running)
        if not running:
            self._flush_ops()
            return events
        t_step = time.perf_counter()
        need, jit_ids, backups, hit_ids = self._plan(running)
        jit_ns = self._dispatch(running, need, jit_ids, backups, hit_ids)
        round_id = self.round_id
        self.round_id += 1
        specs, outcomes, logits, (verify_start, verify_end) = self._verify(running)
        base_len = {s.seq_id: len(s.context) for s in running}  # context each speculation continued
        rows = self._commit(running, specs, outcomes, logits, events)
        lookup_start = time.time_ns()
        entries, on_time = self._receive_cache(running, outcomes, round_id)
        self._publish(running, specs, base_len, entries)
        self._take_next(running, outcomes, entries, on_time)
        jit_served = tuple(s.seq_id for s, sp in zip(running, specs) if sp.source == Source.JIT)  # not those left to the backup
        rates = (None, None, None)  # adaptive: the gate's arm, the plan's predicted and the realised tokens/s
        if self.arm is not None:  # the gate learns what this step realised (ssd/speculation/adaptive.py: step_done)
            committed, now = sum(r.kept for r in rows), time.perf_counter()
            seconds = now - t_step
            self.adaptive.step_done(self.arm, committed, t_step, now, more=any(not s.finished for s in running))
            arm = self.arm[0]
            rates = (arm, self.adaptive.predicted if arm == "spec" else None, committed / max(seconds, 1e-9))
        self._report(StepRecord(round_id, verify_start, verify_end, rows, jit_ns, (lookup_start, time.time_ns()),
                                jit_served, *rates))
        self._retire()
        return events

    def _admit(self) -> list:
        """Prefill newly admitted sequences; the draft hears of them with the next round."""
        new = self.scheduler.admit()
        events = self._prefill(new)
        for s in new:
            if not s.finished and _mode(s) != Mode.AR:  # a request served as AR never reaches the draft
                self.pending_ops.append(AddSequence(s.seq_id, list(s.context), s.params, s.options,
                                                    self._all_features(s)))
                s.speculation = None
                if self.adaptive is not None:  # its rounds feed and read its temperature class's acceptance
                    self.adaptive.register(s.seq_id, s.params)
        self._retire()
        return events

    def _plan(self, running):
        """Which sequences lack a speculation, and where theirs comes from: the JIT draft below
        the critical batch size b*, the fast backup at or above it (or without a draft).
        Adaptive: first the gate (does speculating pay at this load at all: if not, every row
        decodes plainly and the draft builds nothing), then every row's length planned together
        (AdaptiveK.plan): cached and backup speculations cut, JIT rows given 0..K tokens."""
        for s in running:  # requests served as AR: verified with no speculation (a plain decode step)
            if _mode(s) == Mode.AR:
                s.speculation = Proposal.plain()
        self.arm, self.jit_k = None, {}
        ad = self.adaptive
        if ad is not None:
            spec_rows = [s for s in running if _mode(s) != Mode.AR]
            # a step of AR-mode requests only has nothing to gate
            self.arm = ad.speculate([s.seq_id for s in spec_rows], plain=len(running) - len(spec_rows)) if spec_rows else None
            if self.arm is not None and self.arm[0] == "plain":
                for s in spec_rows:
                    self._plain(s)
        need = [s for s in running if s.speculation is None]
        jit_ids, backups = [], {}
        use_jit = len(running) < self.cfg.speculation.critical_batch_size
        if ad is not None and need:
            use_jit = self._measured_prefers_jit(len(running) - len(need), len(need), use_jit)
        for s in need:  # SD requests always draft just in time (the draft sequentially, then verify)
            if self.draft_alive and (use_jit or _mode(s) == Mode.SD):
                jit_ids.append(s.seq_id)
            else:
                backups[s.seq_id] = self._backup(s)
        if self.arm is not None and self.arm[0] == "spec":
            drafted = {s.seq_id: len(s.speculation.token_ids) for s in running
                       if s.speculation is not None and s.speculation.source != Source.NONE}
            plain = sum(1 for s in running if s.speculation is not None and s.speculation.source == Source.NONE)
            ad.plan(jit_ids, drafted, plain)
            self.jit_k = {i: ad.k_for(i) for i in jit_ids}
            for s in running:  # a zero-length JIT row decodes plainly; drafted speculations cut to their plan
                if s.seq_id in self.jit_k and self.jit_k[s.seq_id] == 0:
                    self._plain(s)
                elif s.seq_id in drafted and (self.cfg.speculation.cut_cached or s.seq_id in backups):
                    self._cut(s, ad.k_for_cached(s.seq_id, drafted[s.seq_id]))
            jit_ids = [i for i in jit_ids if self.jit_k[i] > 0]
            backups = {i: s.speculation.token_ids.tolist() for i, s in ((s.seq_id, s) for s in need)
                       if i in backups and s.speculation.source == Source.BACKUP}
        hit_ids = [s.seq_id for s in running if s.speculation is not None and s.speculation.source == Source.CACHE]
        for s in running:  # an index hit is, for the draft, a speculation handed to it
            if s.speculation is not None and s.speculation.source == Source.INDEX:
                backups[s.seq_id] = s.speculation.token_ids.tolist()
        return need, jit_ids, backups, hit_ids

    def _cut(self, s, n: int) -> None:
        """Verify only the first n tokens of a drafted speculation (a prefix of a draft is still a
        draft: exact); 0 leaves the row a plain decode."""
        sp = s.speculation
        if n >= len(sp.token_ids):
            return
        if sp.source in (Source.CACHE, Source.INDEX):
            self.stats.cut_draft_tokens += len(sp.token_ids) - n
        if n == 0:
            self._plain(s)
        else:
            s.speculation = Proposal(sp.token_ids[:n], None if sp.q is None else sp.q[:n], sp.source)

    def _measured_prefers_jit(self, hits: int, misses: int, constant_rule: bool) -> bool:
        """Section 7b: JIT or fast backup for this step's misses, from measured tokens per round
        after each, the JIT wait, the backup's cost and the verify time. A source not yet measured
        is tried first (so both are); before any measurement the constant b* decides."""
        st = self.stats
        jit_known = st.rounds_after_jit >= MIN_ROUNDS and self.jit_wait.value is not None
        backup_known = st.rounds_after_backup >= MIN_ROUNDS and st.n_backup > 0
        if self.verify_wait.value is None or not (jit_known or backup_known):
            return constant_rule
        if not (jit_known and backup_known):
            return not jit_known  # measure the other one
        self.fallback_decisions += 1
        if self.fallback_decisions % EXPLORE_EVERY == 0:  # re-measure the source the rule keeps losing
            return self.last_fallback_was_backup
        e_jit = st.tokens_after_jit / st.rounds_after_jit
        e_backup = st.tokens_after_backup / st.rounds_after_backup
        e_hit = st.tokens_after_hit / st.rounds_after_hit if st.rounds_after_hit else max(e_jit, e_backup)
        jit = prefer_jit(hits, misses, e_hit, e_jit, e_backup, self.jit_wait.value, st.t_backup / st.n_backup,
                         self.verify_wait.value)
        self.last_fallback_was_backup = not jit
        return jit

    def _dispatch(self, running, need, jit_ids, backups, hit_ids):
        """Send the round to the draft; wait for the JIT speculations it asks for. A lost draft
        leaves every sequence without one to the fast backup. Returns the JIT span (ns) or None."""
        if not self.draft_alive:
            self.pending_ops = []
            return None
        jit_ns = None
        self.round_wants_cache = bool(jit_ids or backups or hit_ids)
        # a step that asks the draft for nothing (the gate's plain steps, AR-mode requests only)
        # sends it nothing either, so it costs what an AR step costs: no message, no reply to
        # take in, no draft forward beside the verify. Its ops (new sequences, committed tokens,
        # releases) wait, in order, for the next round that asks for a speculation.
        if not self.round_wants_cache:
            return None
        try:
            jit_k = self.jit_k
            budget = self.budget if self.adaptive is not None else 0
            # cached speculations cut by section 7d: the draft builds the next cache for the prefix verified
            hits = set(hit_ids)
            hit_k = {s.seq_id: len(s.speculation.token_ids) for s in running if s.seq_id in hits
                     and len(s.speculation.token_ids) < self.K}
            self.link.send(RoundRequest(self.round_id, self.pending_ops, jit_ids, backups, hit_ids, jit_k, budget, hit_k))
            self.pending_ops = []
            if jit_ids:
                t0, jit_start = time.perf_counter(), time.time_ns()
                reply = self._recv_kind(JitReply, self.round_id).speculations
                jit_items = {}
                for s in need:
                    if s.seq_id not in reply:  # its draft (one of several) was lost this round
                        self._backup(s)
                        continue
                    tokens, q_ref = reply[s.seq_id].token_ids, reply[s.seq_id].q_ref
                    q = self.link.q_row(q_ref) if q_ref is not None else None
                    s.speculation = Proposal(torch.tensor(tokens), q, Source.JIT)
                    if s.params.greedy and not self.draft_publishes:  # a retry reaching this context will not wait
                        key = self._key(s.context)
                        jit_items[key] = tokens
                        self.published.setdefault(s.seq_id, []).append(key)
                if jit_items:
                    self.index.put_many(jit_items)
                waited = time.perf_counter() - t0
                self.stats.t_jit += waited
                self.stats.n_jit += 1
                self.jit_wait.observe(waited)
                if self.adaptive is not None:  # one draft step: the wait over the longest speculation
                    self.adaptive.draft_step.observe(waited / max([len(sp.token_ids) for sp in reply.values()] or [1]))
                jit_ns = (jit_start, time.time_ns())
        except DraftUnavailable as e:
            self._draft_lost(e)  # drops cache and JIT speculations: the backup takes over
            for s in running:
                if s.speculation is None:
                    self._backup(s)
        return jit_ns

    def _verify(self, running):
        """Every running sequence's speculation in one target forward -> outcomes (k, t*)."""
        t0, verify_start = time.perf_counter(), time.time_ns()
        specs = [s.speculation for s in running]
        # logits for the widest speculation of this step only: the output head is the largest
        # matmul, and a plain step (no speculation) needs one row per sequence, as AR does
        width = 1 + max((sp.token_ids.numel() for sp in specs), default=0)
        logits = self.target.forward(running, [sp.token_ids.tolist() for sp in specs], width)
        outcomes = self._verify_rows(running, logits, specs)
        seconds = time.perf_counter() - t0
        self.stats.t_verify += seconds
        self.verify_wait.observe(seconds)
        if self.adaptive is not None:  # the verify's cost against its widest speculation
            self.adaptive.verify.observe(sum(sp.token_ids.numel() + 1 for sp in specs), seconds)
        self.stats.steps += 1
        return specs, outcomes, logits, (verify_start, time.time_ns())

    def _commit(self, running, specs, outcomes, logits, events) -> list[RoundRow]:
        """Commit each outcome, count it by where its speculation came from, and queue it for the draft."""
        rows = []
        for b, (s, sp, outcome) in enumerate(zip(running, specs, outcomes)):
            if outcome is None:  # this request failed alone (Engine._verify_rows): the others go on
                events.append((s, []))
                continue
            k, t = outcome
            kept = self._commit_outcome(s, sp.token_ids.tolist(), k, t, logits[b])
            if sp.source in (Source.CACHE, Source.INDEX):
                self.stats.tokens_after_hit += len(kept)
                self.stats.rounds_after_hit += 1
            elif sp.source != Source.NONE:
                self.stats.tokens_after_miss += len(kept)
                self.stats.rounds_after_miss += 1
                src = Source.JIT if sp.source == Source.JIT else Source.BACKUP
                setattr(self.stats, f"tokens_after_{src}", getattr(self.stats, f"tokens_after_{src}") + len(kept))
                setattr(self.stats, f"rounds_after_{src}", getattr(self.stats, f"rounds_after_{src}") + 1)
            if self.adaptive is not None:
                self.adaptive.record(s.seq_id, len(sp.token_ids), k)
            events.append((s, kept))
            rows.append(RoundRow(s, len(sp.token_ids), k, len(kept), sp.source, s.spec_result))
            s.speculation, s.spec_result = None, None
            if not s.finished and _mode(s) != Mode.AR:
                self.pending_ops.append(Advance(s.seq_id, list(kept), self._new_features(s)))
        return rows

    def _receive_cache(self, running, outcomes, round_id):
        """The speculation cache the draft built while we verified. Its keys arrive first: when
        every outcome missed we do not wait for the tokens (the next round message makes the
        draft abandon the build). Returns (entries, whether they were there on time)."""
        if not self.draft_alive or not self.round_wants_cache:
            return {}, False
        entries, on_time = {}, False
        t0 = time.perf_counter()
        try:
            keys = self._recv_kind(CacheKeys, round_id).keys
            if any(o in set(keys.get(s.seq_id, ())) for s, o in zip(running, outcomes) if not s.finished):
                on_time = self.link.ready()
                msg = self._recv_kind(CacheReply, round_id)
                entries = msg.entries or {}  # None: abandoned (a draft lost mid-round leaves nothing either)
                self.stats.t_build += msg.seconds
                self.stats.n_build += 1
                if self.adaptive is not None and msg.entries is not None:  # section 7c: build within the verify
                    self.budget = next_budget(self.budget, msg.seconds, self.verify_wait.value, 1,
                                              self.cfg.speculation.fan_out_budget)
            else:
                self.stale_rounds.add(round_id)
        except DraftUnavailable as e:
            self._draft_lost(e)
        self.stats.t_wait_cache += time.perf_counter() - t0
        return entries, on_time

    def _take_next(self, running, outcomes, entries, on_time) -> None:
        """Each unfinished sequence's next speculation: its cache entry for the outcome it had,
        else (greedy) the speculation index, else nothing (a miss: JIT or backup next step)."""
        index_rows = []
        for s, outcome in zip(running, outcomes):
            if s.finished or _mode(s) != "ssd":  # AR and SD requests take no cached speculation
                continue
            k, t = outcome
            entry = entries.get(s.seq_id)
            j = entry.keys.get((k, t)) if entry is not None else None
            if j is None:
                if s.params.greedy:
                    index_rows.append(s)  # maybe another request drafted this very context
                else:
                    self._count(s, "cache_miss")
                continue
            self._count(s, "cache_hit" if on_time else "cache_late")
            q = self.link.q_row(entry.q_ref, j) if entry.q_ref is not None else None
            s.speculation = self._cached(s, entry.token_ids[j], q, Source.CACHE)
        if index_rows:
            found = self.index.get_many([self._key(s.context) for s in index_rows])
            for s, tokens in zip(index_rows, found):
                if tokens is None:
                    self._count(s, "cache_miss")
                else:
                    self._count(s, "cache_hit")
                    self.stats.index_hit += 1
                    s.speculation = self._cached(s, tokens, None, Source.INDEX)

    def _cached(self, s, tokens: list[int], q, source: str) -> Proposal:
        """A speculation from the cache or the index; adaptive, the next step's plan decides how
        much of it is verified (_plan)."""
        return Proposal(torch.tensor(tokens), q, source)

    # ---- speculation index -----------------------------------------------------------------------
    def _key(self, context: list[int]) -> str:
        return context_key(context, self.draft_fingerprint, GREEDY, self.K)

    def _publish(self, running, specs, base_len, entries) -> None:
        """Store every greedy branch of the round's cache under the context it continues
        (unless the draft already published them itself)."""
        if self.draft_publishes:
            return
        items = {}
        for s, sp in zip(running, specs):
            entry = entries.get(s.seq_id)
            if entry is None or not s.params.greedy:
                continue
            mine = branch_items(s.context[: base_len[s.seq_id]], sp.token_ids.tolist(), entry.keys, entry.token_ids,
                                self.draft_fingerprint, self.K)
            self.published.setdefault(s.seq_id, []).extend(mine)
            items.update(mine)
        if items:
            self.index.put_many(items)

    def _count(self, s, result: str) -> None:
        s.spec_result = result[len("cache_"):]  # travels with the speculation to the next round's record
        setattr(self.stats, result, getattr(self.stats, result) + 1)
        setattr(s.spec_stats, result, getattr(s.spec_stats, result) + 1)

    def _plain(self, s) -> None:
        """This round the row decodes plainly (the gate's plain step, or a plan that gives it no
        tokens). A lookup made for it is undone (_count): the cache statistics, the request's and
        the engine's alike, count only the rounds that verified a speculation."""
        if s.spec_result is not None:
            result = "cache_" + s.spec_result
            setattr(self.stats, result, getattr(self.stats, result) - 1)
            setattr(s.spec_stats, result, getattr(s.spec_stats, result) - 1)
            if s.speculation is not None and s.speculation.source == Source.INDEX:
                self.stats.index_hit -= 1
            s.spec_result = None
        s.speculation = Proposal.plain()

    def _backup(self, s) -> tuple:
        t0 = time.perf_counter()
        tokens = ngram.propose(s.context, self.K, self.cfg.speculation.ngram_max)
        q = None if s.params.greedy else ngram.point_mass_probs(tokens, self.vocab_size)
        s.speculation = Proposal(torch.tensor(tokens), q, Source.BACKUP)
        self.stats.t_backup += time.perf_counter() - t0
        self.stats.n_backup += 1
        return tokens

    def _on_finished(self, s) -> None:
        if self.adaptive is not None:
            self.adaptive.forget(s.seq_id)
        keys = self.published.pop(s.seq_id, [])
        if s.finish_reason == "abort":  # cancelled or expired: free its index entries (finished ones age out by TTL)
            self.index.delete_many(keys)
        # a sequence the draft never heard of (its "add" still pending) has nothing to release
        unknown_to_draft = _mode(s) == Mode.AR or any(isinstance(op, AddSequence) and op.seq_id == s.seq_id
                                                   for op in self.pending_ops)
        self.pending_ops = [op for op in self.pending_ops if op.seq_id != s.seq_id]
        if not unknown_to_draft:
            self.pending_ops.append(Release(s.seq_id, s.finish_reason))

    def idle(self) -> None:
        self._flush_ops()  # releases of finished sequences: the draft's load returns to 0

    def _flush_ops(self) -> None:
        if not (self.pending_ops and self.draft_alive):
            return
        try:
            self.link.send(RoundRequest(self.round_id, self.pending_ops))
            self.pending_ops = []
            self._recv_kind(CacheReply, self.round_id)
            self.round_id += 1
        except DraftUnavailable as e:
            self._draft_lost(e)


MIN_ROUNDS = 4  # rounds after a source before its measured tokens per round are trusted
EXPLORE_EVERY = 16  # every so many measured decisions take the other source, keeping both measurements current


def _mode(s) -> str:
    """How a request is decoded (its "mode": ar | sd | ssd); empty = ssd."""
    return s.options.mode or Mode.SSD
