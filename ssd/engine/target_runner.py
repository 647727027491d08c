"""The target side: one batched forward per step over each running sequence's unfed tail
(prefill: the prompt; AR: the pending token; verify: pending token + K speculated tokens)."""
from __future__ import annotations

import torch

from ..kv_cache import append_batch
from .sequence import Sequence


class TargetRunner:
    def __init__(self, model, max_seqs: int, max_model_len: int, k: int):
        self.model = model
        # a feature drafter's layers: each forward then also records, per sequence, the fused
        # inputs of these layers at the positions it fed (Sequence.features; see commit_features)
        self.capture: tuple[int, ...] = ()
        self.vocab_size = model.cfg.vocab_size
        # a verify may write K+1 columns past the committed context before rollback
        self.cache = model.new_cache(max_seqs, max_model_len + k + 2)

    def allocate(self, seq: Sequence) -> None:
        seq.slot = self.cache.allocate()
        seq.cache_len = 0

    def free(self, seq: Sequence) -> None:
        if seq.slot >= 0:
            self.cache.free(seq.slot)
            seq.slot = -1

    @torch.inference_mode()
    def forward(self, seqs: list[Sequence], extra: list[list[int]] | None, num_logits: int) -> torch.Tensor:
        """Feed context[cache_len:] + extra[b] for every row; return the logits of the last
        num_logits fed tokens of each row: [B, num_logits, V]. Advances cache_len by the
        number of context tokens fed (extra tokens are committed by the caller via rollback)."""
        extra = extra or [[] for _ in seqs]
        feeds = [s.context[s.cache_len :] + e for s, e in zip(seqs, extra)]
        n = [len(f) for f in feeds]
        width = max(n)
        ids = torch.tensor([f + [0] * (width - len(f)) for f in feeds], dtype=torch.int64)
        batch = append_batch([s.slot for s in seqs], [s.cache_len for s in seqs], n, device=ids.device)
        # each row's logits start at its pending token (rows with fewer extra tokens, e.g. a
        # target-only sequence in a verify batch, repeat their last position to fill num_logits)
        rows = torch.tensor([[min(x - len(e) - 1 + j, x - 1) if num_logits > len(e) else x - num_logits + j
                              for j in range(num_logits)] for x, e in zip(n, extra)], dtype=torch.int64)
        out = self.model(ids, batch, self.cache, logits_rows=rows, capture=self.capture)
        logits, feats = out if self.capture else (out, None)
        for b, (s, f, e) in enumerate(zip(seqs, feeds, extra)):
            if feats is not None:
                s.fed_features = (s.cache_len, feats[b, :len(f)].to(torch.bfloat16))
            s.cache_len += len(f) - len(e)
        return logits

    @staticmethod
    def commit_features(seq: Sequence) -> torch.Tensor | None:
        """After a commit: append the features of the positions the last forward fed that are now
        committed and no longer pending (every committed position but the last) to
        seq.features, and return them ([n, F]; None when nothing is captured)."""
        if seq.fed_features is None:
            return None
        start, f = seq.fed_features
        seq.fed_features = None
        have = sum(x.shape[0] for x in seq.features)
        if start != have:
            raise RuntimeError(f"feature rows out of step for sequence {seq.seq_id}: {start} != {have}")
        new = f[:max(len(seq.context) - 1 - start, 0)]
        seq.features.append(new)
        return new

    def rollback(self, seq: Sequence) -> None:
        """After committing a round: the target holds KV for all of the context but the
        pending (last) token; columns of rejected draft tokens are dropped."""
        seq.cache_len = len(seq.context) - 1
        self.cache.truncate(seq.slot, seq.cache_len)
