"""Plain autoregressive decoding with the target: the baseline every ratio is taken against."""
from __future__ import annotations

import time

from .base import Engine, RoundRow, StepRecord
from .sequence import Source


class AREngine(Engine):
    """Plain autoregressive decoding with the target: the baseline every ratio is taken against."""

    mode = "ar"

    def step(self):
        new = self.scheduler.admit()
        events = self._prefill(new)
        old = [s for s in self.scheduler.running if s not in new and not s.finished]
        if old:
            t0, start_ns = time.perf_counter(), time.time_ns()
            logits = self.target.forward(old, None, 1)[:, 0]
            self.stats.t_verify += time.perf_counter() - t0
            self.stats.steps += 1
            rows = []
            for b, (s, t) in enumerate(zip(old, self._sample_rows(old, logits))):
                if t is None:  # failed alone
                    events.append((s, []))
                    continue
                kept = self._commit_tokens(s, [t], logits[b:b + 1])
                self.stats.tokens += len(kept)
                self.stats.rounds += 1
                s.spec_stats.record(0, 0)
                events.append((s, kept))
                rows.append(RoundRow(s, drafted=0, accepted=0, kept=len(kept), source=Source.NONE, cache_result=None))
            self._report(StepRecord(self.step_count, start_ns, time.time_ns(), rows))
            self.step_count += 1
        self._retire()
        return events
