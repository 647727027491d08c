"""Saguaro part 1: how many recovery candidates to cache at each rejection depth.

Outcome k of a round has probability pi_k = a^k (1 - a) for k < K and pi_K = a^K (a = measured
per-token acceptance). A fan-out F at one depth misses with probability F^(-r) (power law, r
fitted from measured recovery-token ranks). Maximising sum_k pi_k (1 - F_k^(-r)) subject to
sum_k F_k = B gives F_k proportional to pi_k^(1/(1+r)) (docs/algorithm.md section 3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def geometric_fan_out(budget: int, k: int, acceptance: float, r: float, vocab_size: int | None = None) -> list[int]:
    """F_0..F_K (K+1 entries) summing to `budget`, F_k ∝ pi_k^(1/(1+r))."""
    a = min(max(acceptance, 1e-3), 1 - 1e-3)
    e = 1.0 / (1.0 + max(r, 1e-3))
    weights = [a ** (i * e) for i in range(k)] + [a ** (k * e) * (1 - a) ** (-e)]
    return _apportion(budget, weights, vocab_size)


def uniform_fan_out(budget: int, k: int, vocab_size: int | None = None) -> list[int]:
    return _apportion(budget, [1.0] * (k + 1), vocab_size)


def _apportion(budget: int, weights: list[float], vocab_size: int | None) -> list[int]:
    """Largest-remainder rounding of budget * w / sum(w); each entry capped by the number of
    candidates that exist (vocab_size - 1 at rejection depths, where the drafted token is excluded)."""
    total = sum(weights)
    raw = [budget * w / total for w in weights]
    out = [int(math.floor(x)) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - out[i], reverse=True)
    for i in order[: budget - sum(out)]:
        out[i] += 1
    if vocab_size is not None:
        caps = [vocab_size - 1] * (len(out) - 1) + [vocab_size]
        out = [min(f, c) for f, c in zip(out, caps)]
    return out


@dataclass
class AcceptanceStats:
    """Running estimates that drive one schedule (one instance after hits, one after misses)."""

    max_rank: int = 64
    init_acceptance: float = 0.6
    init_r: float = 1.0
    drafted: int = 0
    accepted: int = 0
    # rank_hist[j]: recovery/bonus tokens that were the j-th candidate (0-based) of the fork at
    # their depth; rank_hist[max_rank]: not among the first max_rank candidates
    rank_hist: np.ndarray = field(default=None)

    def __post_init__(self):
        if self.rank_hist is None:
            self.rank_hist = np.zeros(self.max_rank + 1, dtype=np.int64)

    def record_round(self, num_drafted: int, num_accepted: int, recovery_rank: int | None):
        self.drafted += num_drafted
        self.accepted += num_accepted
        if recovery_rank is not None:
            self.rank_hist[min(recovery_rank, self.max_rank)] += 1

    @property
    def acceptance(self) -> float:
        # a prior worth 20 drafted tokens keeps early rounds from swinging the schedule
        prior = 20
        return (self.accepted + prior * self.init_acceptance) / (self.drafted + prior)

    def fitted_r(self) -> float:
        return fit_power_law(self.rank_hist, self.init_r)


def fit_power_law(rank_hist: np.ndarray, default_r: float, min_samples: int = 30) -> float:
    """Least-squares fit of log(1 - p_hit(F)) = -r log F over F = 1..max_rank, from the
    histogram of recovery-token ranks among the fork candidates."""
    n = int(rank_hist.sum())
    if n < min_samples:
        return default_r
    hit_within = np.cumsum(rank_hist[:-1]) / n  # p_hit(F) for F = 1..max_rank
    miss = 1.0 - hit_within
    f = np.arange(1, len(miss) + 1)
    keep = (miss > 0) & (miss < 1) & (rank_hist[:-1].cumsum() > 0)
    if keep.sum() < 2:
        return default_r
    x, y = np.log(f[keep]), np.log(miss[keep])
    slope = float((x * y).sum() / (x * x).sum())  # through the origin: miss(1) = 1 in the model
    return float(np.clip(-slope, 0.05, 10.0))


@dataclass
class FanOutPlanner:
    """Separate hit/miss schedules (paper: one used after a hit, one after a miss)."""

    budget: int
    k: int
    kind: str = "geometric"
    vocab_size: int | None = None
    init_acceptance: float = 0.6
    init_r: float = 1.0

    def __post_init__(self):
        self.stats = {
            "hit": AcceptanceStats(init_acceptance=self.init_acceptance, init_r=self.init_r),
            "miss": AcceptanceStats(init_acceptance=self.init_acceptance, init_r=self.init_r),
        }

    def schedule(self, after: str, k: int | None = None) -> list[int]:
        """F_0..F_k (k: the speculation's length, K when None; adaptive JIT drafts may be shorter)."""
        k = self.k if k is None else k
        if self.kind == "uniform":
            return uniform_fan_out(self.budget, k, self.vocab_size)
        s = self.stats[after]
        return geometric_fan_out(self.budget, k, s.acceptance, s.fitted_r(), self.vocab_size)
