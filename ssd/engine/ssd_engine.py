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

from ..config import EngineConfig
from ..spec import ngram
from .base import Engine
from .draft_link import DraftUnavailable, ProcessDraftLink


log = logging.getLogger(__name__)


class SSDEngine(Engine):
    mode = "ssd"

    def __init__(self, cfg: EngineConfig, target_model, draft_spec: dict, eos_token_ids, seed: int = 0,
                 start_timeout: float = 300.0, link=None):
        super().__init__(cfg, target_model, eos_token_ids)
        self.link = link or ProcessDraftLink(draft_spec, cfg.spec, cfg.max_batch, cfg.max_model_len, cfg.draft_threads,
                                             self.vocab_size, seed, start_timeout)
        self.draft_alive = True
        self.draft_error: str | None = None
        self.round_id = 0
        self.pending_ops: list[tuple] = []
        self.stale_rounds: set[int] = set()  # rounds whose cache we stopped waiting for
        if self.link.info["vocab_size"] != self.vocab_size:
            raise ValueError(f"draft vocabulary {self.link.info['vocab_size']} != target vocabulary {self.vocab_size}")

    # ---- transport -----------------------------------------------------------------------------
    def _recv_kind(self, kind: str, round_id: int):
        """The next message of this kind for this round, skipping the replies of abandoned rounds."""
        while True:
            msg = self.link.recv()
            if msg[0] == kind and msg[1] == round_id:
                return msg
            if msg[0] in ("keys", "cache") and (msg[1] in self.stale_rounds or msg[1] < round_id):
                if msg[0] == "cache":
                    self.stale_rounds.discard(msg[1])
                continue
            raise DraftUnavailable(f"draft protocol error: expected {kind} for round {round_id}, got {msg[0]} for {msg[1]}")

    def _draft_lost(self, err: Exception) -> None:
        """Invariant 2: a dead draft never changes the output nor stalls a sequence; from now on
        every speculation comes from the fast backup."""
        log.warning("draft lost, continuing with the fast backup: %s", err)
        self.draft_error = str(err)
        self.draft_alive = False
        for s in self.scheduler.running:
            if s.speculation is not None and s.speculation[2] != "backup":
                s.speculation = None

    def close(self) -> None:
        self.link.close()

    # ---- one step: schedule, run, postprocess -------------------------------------------------
    def step(self):
        new = self.scheduler.admit()
        events = self._prefill(new)
        for s in new:
            if not s.finished:
                self.pending_ops.append((s.seq_id, "add", (s.context, s.params)))
                s.speculation = None
        self._retire()
        running = list(self.scheduler.running)
        if not running:
            self._flush_ops()
            return events

        need = [s for s in running if s.speculation is None]
        jit_ids, backups = [], {}
        if need and self.draft_alive and len(running) < self.cfg.spec.critical_batch_size:
            jit_ids = [s.seq_id for s in need]
        else:
            for s in need:
                backups[s.seq_id] = self._backup(s)
        hit_ids = [s.seq_id for s in running if s.speculation is not None and s.speculation[2] == "cache"]
        if self.draft_alive:
            try:
                self.link.send(("round", self.round_id, self.pending_ops, jit_ids, backups, hit_ids))
                self.pending_ops = []
                if jit_ids:
                    t0 = time.perf_counter()
                    _, _, reply, _ = self._recv_kind("jit", self.round_id)
                    for s in need:
                        tokens, q_ref = reply[s.seq_id]
                        q = self.link.q_row(q_ref) if q_ref is not None else None
                        s.speculation = (torch.tensor(tokens), q, "jit")
                    self.stats.t_jit += time.perf_counter() - t0
                    self.stats.n_jit += 1
            except DraftUnavailable as e:
                self._draft_lost(e)  # drops cache and JIT speculations: the backup takes over
                for s in running:
                    if s.speculation is None:
                        self._backup(s)
        else:
            self.pending_ops = []

        # verify every running sequence's speculation in one target forward
        t0 = time.perf_counter()
        specs = [s.speculation for s in running]
        logits = self.target.forward(running, [sp[0].tolist() for sp in specs], self.K + 1)
        outcomes = self._verify_rows(running, logits, specs)
        self.stats.t_verify += time.perf_counter() - t0
        self.stats.steps += 1
        round_id = self.round_id
        self.round_id += 1

        for s, sp, (k, t) in zip(running, specs, outcomes):
            kept = self._commit_outcome(s, sp[0].tolist(), k, t)
            if sp[2] == "cache":
                self.stats.tokens_after_hit += len(kept)
                self.stats.rounds_after_hit += 1
            else:
                self.stats.tokens_after_miss += len(kept)
                self.stats.rounds_after_miss += 1
            events.append((s, kept))
            s.speculation = None
            if not s.finished:
                self.pending_ops.append((s.seq_id, "outcome", kept))

        # the speculation cache the draft built while we verified. Its keys arrive first: when
        # every outcome missed we do not wait for the tokens; the next round message (JIT)
        # makes the draft abandon the build.
        entries, on_time = {}, False
        if self.draft_alive:
            t0 = time.perf_counter()
            try:
                keys = self._recv_kind("keys", round_id)[2]
                if any((k, t) in set(keys.get(s.seq_id, ())) for s, (k, t) in zip(running, outcomes) if not s.finished):
                    on_time = self.link.ready()
                    msg = self._recv_kind("cache", round_id)
                    entries = msg[2]
                    self.stats.t_build += msg[3]
                    self.stats.n_build += 1
                else:
                    self.stale_rounds.add(round_id)
            except DraftUnavailable as e:
                self._draft_lost(e)
            self.stats.t_wait_cache += time.perf_counter() - t0
        for s, (k, t) in zip(running, outcomes):
            if s.finished:
                continue
            entry = entries.get(s.seq_id)
            j = entry[0].get((k, t)) if entry is not None else None
            if j is None:
                self.stats.cache_miss += 1
                s.spec_stats.cache_miss += 1
                continue
            if on_time:
                self.stats.cache_hit += 1
                s.spec_stats.cache_hit += 1
            else:
                self.stats.cache_late += 1
                s.spec_stats.cache_late += 1
            q = None
            if entry[2] is not None:
                q = self.link.q_row(entry[2], j)
            s.speculation = (torch.tensor(entry[1][j]), q, "cache")
        self._retire()
        return events

    def _backup(self, s) -> tuple:
        t0 = time.perf_counter()
        tokens = ngram.propose(s.context, self.K, self.cfg.spec.ngram_max)
        q = None if s.params.greedy else ngram.point_mass_probs(tokens, self.vocab_size)
        s.speculation = (torch.tensor(tokens), q, "backup")
        self.stats.t_backup += time.perf_counter() - t0
        self.stats.n_backup += 1
        return tokens

    def _on_finished(self, s) -> None:
        # a sequence the draft never heard of (its "add" still pending) has nothing to release
        unknown_to_draft = any(op[0] == s.seq_id and op[1] == "add" for op in self.pending_ops)
        self.pending_ops = [op for op in self.pending_ops if op[0] != s.seq_id]
        if not unknown_to_draft:
            self.pending_ops.append((s.seq_id, "release", None))

    def _flush_ops(self) -> None:
        if not (self.pending_ops and self.draft_alive):
            return
        try:
            self.link.send(("round", self.round_id, self.pending_ops, [], {}, []))
            self.pending_ops = []
            self._recv_kind("cache", self.round_id)
            self.round_id += 1
        except DraftUnavailable as e:
            self._draft_lost(e)
