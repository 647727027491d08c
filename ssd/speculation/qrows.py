"""Draft distributions q as they travel: over the draft head's support only.

A draft with a reduced-vocabulary head (ssd/models/llama.py: LlamaModel.set_head) scores Vh of
the V tokens; every other token has q = 0 exactly and is never proposed. Its q rows are kept
[..., K, Vh] from the draft runner to the last hop (shared memory, gRPC bytes, the tensor
channel), and widened to [..., K, V] only where the ratio test needs them. Values stay the
draft's own fp32: the ratio test must see the very distribution each token was drawn from, so
rounding q to the model dtype on the way would make verification inexact.
"""
from __future__ import annotations

import torch


def to_vocab(q: torch.Tensor | None, support: torch.Tensor | None, vocab_size: int) -> torch.Tensor | None:
    """q [..., S] over the token ids `support` [S] -> [..., vocab_size] with zeros elsewhere.
    support None: q already spans the vocabulary."""
    if q is None or support is None:
        return q
    out = q.new_zeros(*q.shape[:-1], vocab_size)
    return out.index_copy_(-1, support, q)


def support_of(q: torch.Tensor) -> torch.Tensor:
    """Columns of q [..., V] where some row is nonzero (the union support) -> int64 [S]."""
    return (q.reshape(-1, q.shape[-1]) != 0).any(0).nonzero().flatten()
