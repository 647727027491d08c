"""Turning logits into the distributions that drafting and verification use.

Target probabilities p and draft probabilities q must be produced by the same processing
(temperature, top-k, top-p) so the ratio test compares like with like; the draft's q may
additionally be reshaped by Saguaro sampling (docs/algorithm.md section 4).
"""
from __future__ import annotations

import torch

from .config import SamplingParams


def adjust_logits(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
                  drafted: list[int] = (), eos_token_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """The target's logits after penalties, logit_bias and min_tokens, for n consecutive positions.

    logits [n, V]: row i is the distribution of the token after output_ids + drafted[:i] (a
    verify block: row 0 follows the committed output, row i the first i draft tokens), so each
    row is adjusted exactly as AR decoding would adjust it at that position; greedy and sampled
    verification then compare against the adjusted rows and stay exact. Returns fp32 [n, V]
    (the input itself when params adjust nothing). Order: repetition penalty (prompt and output
    tokens: positive logits divided, negative multiplied), frequency and presence penalties
    (output tokens), logit_bias, then end-of-sequence tokens masked while fewer than min_tokens
    tokens were generated (unless ignore_eos)."""
    if not params.adjusts_logits:
        return logits
    n, vocab = logits.shape
    x = logits.float().clone()
    dev = x.device
    drafted = list(drafted)[: n - 1]
    # counts[i, v]: occurrences of v in output_ids + drafted[:i]
    base = torch.bincount(torch.tensor(output_ids, dtype=torch.int64, device=dev), minlength=vocab)[:vocab].float()
    counts = base.expand(n, vocab).clone()
    if drafted:
        steps = torch.zeros(n, vocab, device=dev)
        steps[torch.arange(1, len(drafted) + 1, device=dev), torch.tensor(drafted, dtype=torch.int64, device=dev)] = 1.0
        counts += steps.cumsum(0)
    if params.repetition_penalty != 1.0:
        seen = counts > 0
        if prompt_ids:
            seen[:, torch.tensor(sorted(set(prompt_ids)), dtype=torch.int64, device=dev)] = True
        r = params.repetition_penalty
        x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    if params.frequency_penalty:
        x -= params.frequency_penalty * counts
    if params.presence_penalty:
        x -= params.presence_penalty * (counts > 0).float()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias if t < vocab], dtype=torch.int64, device=dev)
        bias = torch.tensor([b for t, b in params.logit_bias if t < vocab], dtype=x.dtype, device=dev)
        x[:, ids] += bias
    if params.min_tokens and eos_token_ids and not params.ignore_eos:
        early = torch.arange(n, device=dev) + len(output_ids) < params.min_tokens  # rows before min_tokens
        eos = torch.tensor([t for t in eos_token_ids if t < vocab], dtype=torch.int64, device=dev)
        rows = early.nonzero().flatten()
        if rows.numel() and eos.numel():
            x[rows.unsqueeze(1), eos.unsqueeze(0)] = float("-inf")
    return x


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """The model's own log-probability of each chosen token and its `top` most likely
    alternatives: log-softmax of the raw logits [n, V] (before temperature, top-k/top-p,
    penalties and bias), row i for tokens[i]."""
    lp = torch.log_softmax(logits[: len(tokens)].float(), dim=-1)
    chosen = lp[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.int64)].tolist()
    if top:
        vals, ids = torch.topk(lp, top, dim=-1)
        alts = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    else:
        alts = [[] for _ in tokens]
    return list(zip(chosen, alts))


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


# ---- seeded requests: the noise of each output position is fixed by (seed, position) ----------
_M64 = (1 << 64) - 1


def _position_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed for one output position of a seeded request: splitmix64's
    finaliser over the seed and the position, so neighbouring seeds and positions give
    unrelated streams."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) >> 1


def position_noise(seed: int, positions, vocab: int) -> torch.Tensor:
    """Exp(1) variates [len(positions), vocab] for the tokens at these context positions (index
    in prompt + output) of a seeded request; they depend on nothing else (not the batch, the
    mode, the draft, or the time), so target and draft draw the same ones."""
    rows = []
    for j in positions:
        g = torch.Generator().manual_seed(_position_seed(seed, int(j)))
        # -log(1 - U), U uniform on [0, 1) in float64: E is never 0 nor inf in practice (a float32
        # U would hit an end with probability ~vocab * 2^-24 per position, forcing or banning a
        # token); and 5x faster than exponential_ here
        u = torch.rand(vocab, dtype=torch.float64, generator=g)
        rows.append(torch.log1p(-u).neg_().to(torch.float32))
    return torch.stack(rows)


def coupled_scores(probs: torch.Tensor, seed: int, start: int, cache: dict | None = None) -> torch.Tensor:
    """probs [n, V] of context positions start.. -> scores whose argmax is the token drawn there:
    argmax_v p(v) / E(v) with E ~ Exp(1) i.i.d. (the exponential race, i.e. the Gumbel-max
    trick) is an exact sample from p. Verifying a speculation then means comparing each draft
    token with these argmaxes, as in greedy decoding: the output is a function of the seed and
    the input alone, the same in AR, SD and SSD whatever the draft proposed. cache: the
    request's {position: noise} (positions before start are dropped from it)."""
    n, vocab = probs.shape
    if cache is None:
        e = position_noise(seed, range(start, start + n), vocab)
    else:  # a sequence's own: a rejected round verifies some of the same positions again
        for j in [j for j in cache if j < start]:
            del cache[j]
        for j in range(start, start + n):
            if j not in cache:
                cache[j] = position_noise(seed, [j], vocab)[0]
        e = torch.stack([cache[j] for j in range(start, start + n)])
    return probs.float() / e.to(probs.device)
