"""Engines for tests that are not about the process boundary: the SSD engine's draft on a
thread of the test's own process (ssd/engine/draft_link.py, ThreadDraftLink), the same round
protocol and messages without spawning a process per engine."""
from ssd.engine import SSDEngine
from ssd.engine.draft_link import ThreadDraftLink


def in_process(cfg, target, draft_desc, eos_token_ids, seed: int = 0, **kw) -> SSDEngine:
    link = ThreadDraftLink(draft_desc, cfg.speculation, cfg.max_batch, cfg.max_model_len, seed=seed)
    return SSDEngine(cfg, target, draft_desc, eos_token_ids, seed=seed, link=link, **kw)
