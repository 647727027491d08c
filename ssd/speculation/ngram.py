"""Fast backup speculator: prompt lookup (n-gram match against the sequence's own context).

Its proposals are a deterministic function of the context, so its draft distribution q is a
point mass on each proposed token. The ratio test with that q is exact: accept d with
probability p(d); on rejection the recovery token comes from p with d removed. This keeps
sampled output lossless after a fast-backup miss (docs/algorithm.md section 5).
"""
from __future__ import annotations

import torch


def propose(context: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """K tokens that followed the most recent earlier occurrence of the longest matching suffix.
    Falls back to repeating the last token (still a deterministic, known q)."""
    n_ctx = len(context)
    for n in range(min(max_ngram, n_ctx - 1), min_ngram - 1, -1):
        suffix = context[n_ctx - n :]
        # scan right to left for the most recent earlier occurrence
        for start in range(n_ctx - n - 1, -1, -1):
            if context[start : start + n] == suffix:
                follow = context[start + n : start + n + k]
                if follow:
                    while len(follow) < k:
                        follow.append(follow[-1])
                    return follow
    return [context[-1]] * k


def point_mass_probs(token_ids: list[int], vocab_size: int) -> torch.Tensor:
    """q rows of a deterministic proposer. -> [K, V] fp32."""
    q = torch.zeros(len(token_ids), vocab_size)
    q[torch.arange(len(token_ids)), torch.tensor(token_ids)] = 1.0
    return q
