"""Verification of a speculation: the rejection sampler (Leviathan et al. 2023).

Definitions used everywhere in ssd:
- a speculation is K draft tokens d_1..d_K, each drafted from the draft distribution q_i;
- the target scores K+1 positions in one forward: p_1..p_{K+1} (p_i predicts d_i's slot);
- *accepted*: d_i is kept with probability min(1, p_i(d_i) / q_i(d_i)), left to right, stopping
  at the first rejection; k = number accepted (0..K);
- *recovery* token: at the first rejection (k < K) a token drawn from norm(max(0, p_{k+1} - q_{k+1}));
- *bonus* token: when all K are accepted, a token drawn from p_{K+1};
- the *outcome* of a round is (k, t*) with t* the recovery or bonus token.
Greedy: accept while d_i == argmax p_i; t* = argmax p_{k+1}.

Both samplers take their uniforms explicitly so the batched kernel can be compared with the
loop reference draw for draw; `verify` draws them from a torch.Generator.
"""
from __future__ import annotations

import torch


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sample rows of probs [B, V] with uniforms u [B] -> [B] int64 (unnormalised rows allowed)."""
    cdf = probs.cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    idx = idx.clamp_max(probs.shape[-1] - 1)
    # never land on a zero-probability token because of rounding at the top end
    zero = probs.gather(-1, idx.unsqueeze(-1)).squeeze(-1) <= 0
    if bool(zero.any()):
        last_nonzero = (probs > 0).float().cumsum(-1).argmax(-1)
        idx = torch.where(zero, last_nonzero, idx)
    return idx


def greedy_verify(draft_token_ids: torch.Tensor, target_logits: torch.Tensor):
    """draft_token_ids [B, K]; target_logits [B, K+1, V] -> (num_accepted [B], token [B])."""
    target_argmax = target_logits.argmax(-1)  # [B, K+1]
    match = (draft_token_ids == target_argmax[:, :-1]).to(torch.int64)
    num_accepted = match.cumprod(-1).sum(-1)  # [B]
    token = target_argmax.gather(-1, num_accepted.unsqueeze(-1)).squeeze(-1)
    return num_accepted, token


def rejection_sample(
    draft_token_ids: torch.Tensor,  # [B, K]
    draft_probs: torch.Tensor,  # [B, K, V] the exact q each d_i was sampled from
    target_probs: torch.Tensor,  # [B, K+1, V]
    u_accept: torch.Tensor,  # [B, K] uniforms for the ratio tests
    u_token: torch.Tensor,  # [B] uniforms for the recovery/bonus draw
):
    B, K = draft_token_ids.shape
    idx = draft_token_ids.unsqueeze(-1)
    p_d = target_probs[:, :K].gather(-1, idx).squeeze(-1)  # [B, K]
    q_d = draft_probs.gather(-1, idx).squeeze(-1)  # [B, K]
    accept = (u_accept * q_d < p_d).to(torch.int64)  # u < p/q without dividing by q
    num_accepted = accept.cumprod(-1).sum(-1)  # [B]
    rows = torch.arange(B, device=draft_token_ids.device)
    p_sel = target_probs[rows, num_accepted]  # [B, V]
    q_sel = draft_probs[rows, num_accepted.clamp_max(K - 1)]  # [B, V]
    rejected = (num_accepted < K).unsqueeze(-1)
    residual = torch.where(rejected, (p_sel - q_sel).clamp_min(0.0), p_sel)
    # p == q exactly leaves no residual mass; the rejection then had probability 0, use p
    empty = residual.sum(-1, keepdim=True) <= 0
    residual = torch.where(empty, p_sel, residual)
    token = _inverse_cdf(residual, u_token)
    return num_accepted, token


def rejection_sample_reference(draft_token_ids, draft_probs, target_probs, u_accept, u_token):
    """Row-by-row, position-by-position oracle for rejection_sample."""
    B, K = draft_token_ids.shape
    out_k, out_t = [], []
    for b in range(B):
        k = 0
        while k < K:
            d = int(draft_token_ids[b, k])
            p, q = float(target_probs[b, k, d]), float(draft_probs[b, k, d])
            if float(u_accept[b, k]) < (p / q if q > 0 else float("inf")):
                k += 1
            else:
                break
        if k < K:
            dist = (target_probs[b, k] - draft_probs[b, k]).clamp_min(0.0)
            if float(dist.sum()) <= 0:
                dist = target_probs[b, k].clone()
        else:
            dist = target_probs[b, K].clone()
        tok = _inverse_cdf(dist.unsqueeze(0), u_token[b : b + 1])[0]
        out_k.append(k)
        out_t.append(int(tok))
    return torch.tensor(out_k), torch.tensor(out_t)


def verify(draft_token_ids, target_logits_or_probs, draft_probs=None, generator=None):
    """Greedy when draft_probs is None (second argument = target logits), else the ratio test
    (second argument = target probabilities after the request's processing)."""
    if draft_probs is None:
        return greedy_verify(draft_token_ids, target_logits_or_probs)
    B, K = draft_token_ids.shape
    dev = draft_token_ids.device
    u_accept = torch.rand((B, K), generator=generator, device=dev)
    u_token = torch.rand((B,), generator=generator, device=dev)
    return rejection_sample(draft_token_ids, draft_probs, target_logits_or_probs, u_accept, u_token)
