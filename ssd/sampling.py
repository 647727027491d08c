"""Turning logits into the distributions that drafting and verification use.

Target probabilities p and draft probabilities q must be produced by the same processing
(temperature, top-k, top-p) so the ratio test compares like with like; the draft's q may
additionally be reshaped by Saguaro sampling (docs/algorithm.md section 4).
"""
from __future__ import annotations

import torch

from .config import SamplingParams


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p. logits [..., V] -> probs [..., V] fp32."""
    if params.greedy:
        raise ValueError("greedy decoding has no distribution; use argmax")
    x = logits.float() / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def saguaro_reshape(probs: torch.Tensor, fan_out: torch.Tensor | int, c: float) -> torch.Tensor:
    """Saguaro sampling sigma_{F,C}: multiply the draft's top-F tokens by C and renormalise.

    probs [..., V]; fan_out: int or tensor broadcastable to probs[..., 0] (F per row).
    With C < 1 the residual max(0, p - sigma) gains mass exactly on the top-F tokens, which are
    the recovery candidates the speculation cache holds, so hits rise (paper, section 4).
    """
    if c >= 1.0:
        return probs
    fan_out_t = torch.as_tensor(fan_out, device=probs.device).expand(probs.shape[:-1])
    f_max = min(int(fan_out_t.max().item()), probs.shape[-1]) if fan_out_t.numel() else 0
    if f_max == 0:
        return probs
    top_idx = torch.topk(probs, f_max, dim=-1).indices  # [..., f_max]
    rank = torch.arange(f_max, device=probs.device)
    in_top = rank < fan_out_t.unsqueeze(-1)  # [..., f_max]
    scale = torch.where(in_top, torch.tensor(c, dtype=probs.dtype), torch.tensor(1.0, dtype=probs.dtype))
    weights = torch.ones_like(probs).scatter(-1, top_idx, scale)
    out = probs * weights
    total = out.sum(-1, keepdim=True)
    # C = 0 on a distribution concentrated on its top-F: fall back to the unshaped row
    return torch.where(total > 0, out / total.clamp_min(1e-30), probs)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row. probs [..., V] -> [...] int64."""
    flat = probs.reshape(-1, probs.shape[-1])
    out = torch.multinomial(flat, 1, generator=generator).squeeze(-1)
    return out.reshape(probs.shape[:-1])
