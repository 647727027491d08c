"""Ordinary speculative decoding: the draft proposes K tokens, then the target verifies them.
Sequential by construction (the draft waits for the outcome), so the draft runs in-process."""
from __future__ import annotations

import time

from ..config import EngineConfig
from .base import Engine
from .draft_runner import DraftRunner
from ..speculation.adaptive import AdaptiveK, SpeculationGate
from ..speculation.qrows import to_vocab
from .sequence import Proposal, Source


class SDEngine(Engine):
    mode = "sd"

    def __init__(self, cfg: EngineConfig, target_model, draft_model, eos_token_ids):
        super().__init__(cfg, target_model, eos_token_ids)
        self.draft = DraftRunner(draft_model, cfg.speculation, cfg.max_batch, cfg.max_model_len)
        self.target.capture = self.draft.feature_layers  # a feature drafter reads these target layers
        spec = cfg.speculation
        # adaptive K per sequence and round (docs/algorithm.md section 7a), 0 included: a row whose
        # speculation would not pay decodes plainly; None: always K
        self.adaptive = AdaptiveK(self.K, spec.init_acceptance, allow_zero=True,
                                  gate=SpeculationGate() if spec.gate else None) if spec.adaptive else None

    def step(self):
        if self.adaptive is not None:  # the previous step's period ends here (the gate measures it)
            self.adaptive.step_begins(time.perf_counter())
        new = self.scheduler.admit()
        events = self._prefill(new)
        for s in new:
            if not s.finished:
                self.draft.add(s.seq_id, s.context, s.params, self._new_features(s))
                if self.adaptive is not None:
                    self.adaptive.register(s.seq_id, s.params)
        old = [s for s in self.scheduler.running if s not in new and not s.finished]
        if old:
            t0 = time.perf_counter()
            lengths, arm = None, None
            if self.adaptive is not None:  # the gate: speculate at all this step; then K per row, planned together
                arm = self.adaptive.speculate([s.seq_id for s in old])
                if arm[0] == "spec":
                    self.adaptive.plan([s.seq_id for s in old])
                    lengths = {s.seq_id: self.adaptive.k_for(s.seq_id) for s in old}
                else:
                    lengths = {s.seq_id: 0 for s in old}
            # rows given K = 0 draft nothing this round (the draft catches up on their context later)
            drafted = self.draft.jit([s.seq_id for s in old if lengths is None or lengths[s.seq_id] > 0], after="miss",
                                     lengths=lengths)
            t1 = time.perf_counter()
            d = self.draft
            plain = Proposal.plain()
            specs = [Proposal(drafted[s.seq_id][0], to_vocab(drafted[s.seq_id][1], d.head_ids, d.vocab_size), Source.JIT)
                     if s.seq_id in drafted else plain for s in old]
            # logits for the widest speculation of this step only: the output head is the largest
            # matmul, and a plain step (no speculation) needs one row per sequence, as AR does
            width = 1 + max((sp.token_ids.numel() for sp in specs), default=0)
            logits = self.target.forward(old, [sp.token_ids.tolist() for sp in specs], width)
            t2 = time.perf_counter()
            self.stats.t_draft += t1 - t0
            self.stats.t_verify += t2 - t1
            self.stats.steps += 1
            if self.adaptive is not None:  # measured costs: one draft step, a verify vs its width
                longest = max(sp.token_ids.numel() for sp in specs)
                if longest:  # nothing drafted: no draft step was timed
                    self.adaptive.draft_step.observe((t1 - t0) / longest)
                self.adaptive.verify.observe(sum(sp.token_ids.numel() + 1 for sp in specs), t2 - t1)
            committed = 0
            for b, (s, sp, outcome) in enumerate(zip(old, specs, self._verify_rows(old, logits, specs))):
                if outcome is None:  # failed alone
                    events.append((s, []))
                    continue
                kept = self._commit_outcome(s, sp.token_ids.tolist(), *outcome, logits[b])
                if self.adaptive is not None:
                    self.adaptive.record(s.seq_id, sp.token_ids.numel(), outcome[0])
                self.stats.tokens_after_miss += len(kept)
                self.stats.rounds_after_miss += 1
                events.append((s, kept))
                committed += len(kept)
                if not s.finished:
                    self.draft.on_outcome(s.seq_id, kept, self._new_features(s))
            if arm is not None:
                self.adaptive.step_done(arm, committed, t0, time.perf_counter(),
                                        more=any(not s.finished for s in self.scheduler.running))
        self._retire()
        return events

    def _on_finished(self, seq) -> None:
        self.draft.release(seq.seq_id)
        if self.adaptive is not None:
            self.adaptive.forget(seq.seq_id)
