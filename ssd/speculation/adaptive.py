"""Adaptive speculation: K per round and per sequence, the fallback after a miss (b*) and the
fan-out budget, each chosen from measured numbers instead of constants (docs/algorithm.md
section 7). Pure policy: the engines feed it timings and outcomes and ask it for decisions; it
never touches tokens, so any choice it makes leaves the output exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ALPHA_FLOOR, ALPHA_CEIL = 0.02, 0.98  # keep 1 - alpha away from 0 and log/ratios finite
PRIOR_POSITIONS = 20  # the engine-wide estimate starts worth this many observed positions


def expected_tokens(alpha: float, k: int) -> float:
    """Committed tokens of a round that drafts k tokens, each accepted with probability alpha
    given the ones before it: 1 + alpha + ... + alpha^k = (1 - alpha^(k+1)) / (1 - alpha)."""
    a = min(max(alpha, ALPHA_FLOOR), ALPHA_CEIL)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def expected_tokens_profile(rates, k: int) -> float:
    """Committed tokens of a round that drafts k tokens when position j is accepted with
    probability rates[j-1] given positions 1..j-1 were: 1 + a_1 + a_1 a_2 + ... + a_1...a_k."""
    total, reach = 1.0, 1.0
    for a in rates[:k]:
        reach *= min(max(a, ALPHA_FLOOR), ALPHA_CEIL)
        total += reach
    return total


def choose_k(alpha, k_max: int, draft_step_s: float, verify_s, k_min: int = 1) -> int:
    """The k in k_min..k_max that maximises expected committed tokens per second of a round,
    E(k) / (verify_s(k) + k * draft_step_s); verify_s(k): seconds of a verify with k drafted
    tokens per row. alpha: one acceptance for every position (E is the geometric sum), or the
    conditional acceptance of each position 1..k_max. k_min 0 admits a plain decode row (E(0) = 1,
    no drafting): speculation that does not pay is not made. Ties go to the smaller k."""
    rates = [alpha] * k_max if isinstance(alpha, (int, float)) else alpha
    best_k, best_rate = k_min, -1.0
    for k in range(k_min, k_max + 1):
        cost = verify_s(k) + k * draft_step_s
        rate = expected_tokens_profile(rates, k) / max(cost, 1e-9)
        if rate > best_rate * (1 + 1e-9):
            best_k, best_rate = k, rate
    return best_k


def ewma_acceptance(alpha: float, drafted: int, accepted: int, weight: float) -> float:
    """Update a per-position acceptance estimate with one verified round: positions 1..accepted
    were accepted, position accepted+1 (if drafted) was rejected, later ones were not tried."""
    for _ in range(accepted):
        alpha += weight * (1.0 - alpha)
    if accepted < drafted:
        alpha += weight * (0.0 - alpha)
    return alpha


@dataclass
class LinearCost:
    """seconds(n) = c0 + c1 * n from exponentially decayed least squares over observations
    (n, seconds); with a single distinct n seen, c1 = 0 (a flat cost)."""

    decay: float = 0.9
    sw: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def observe(self, n: float, seconds: float) -> None:
        d = self.decay
        self.sw = d * self.sw + 1.0
        self.sx = d * self.sx + n
        self.sy = d * self.sy + seconds
        self.sxx = d * self.sxx + n * n
        self.sxy = d * self.sxy + n * seconds

    @property
    def known(self) -> bool:
        return self.sw > 0

    def coefficients(self) -> tuple[float, float]:
        mx, my = self.sx / self.sw, self.sy / self.sw
        var = self.sxx / self.sw - mx * mx
        c1 = (self.sxy / self.sw - mx * my) / var if var > 1e-9 else 0.0
        c1 = max(c1, 0.0)  # more tokens never cost less; noise must not say otherwise
        return my - c1 * mx, c1

    def __call__(self, n: float) -> float:
        c0, c1 = self.coefficients()
        return max(c0 + c1 * n, 0.0)


@dataclass
class Ewma:
    weight: float = 0.2
    value: float | None = None

    def observe(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.weight * (x - self.value)


def prefer_jit(hits: int, misses: int, e_hit: float, e_jit: float, e_backup: float,
               jit_s: float, backup_s: float, verify_s: float) -> bool:
    """Section 7b: a step with `misses` sequences lacking a speculation (and `hits` with one).
    JIT costs jit_s before the verify and gives e_jit tokens per missed row; the backup costs
    backup_s per missed row and gives e_backup. True when JIT gives more tokens per second."""
    rate_jit = (hits * e_hit + misses * e_jit) / max(jit_s + verify_s, 1e-9)
    rate_backup = (hits * e_hit + misses * e_backup) / max(misses * backup_s + verify_s, 1e-9)
    return rate_jit > rate_backup


def next_budget(budget: int, build_s: float, verify_s: float, lo: int, hi: int, slack: float = 0.8) -> int:
    """Section 7c: the cache build should end within the verify. One branch less while the build
    takes longer than the verify; one more while it takes under slack * verify; within [lo, hi]."""
    if build_s > verify_s:
        budget -= 1
    elif build_s < slack * verify_s:
        budget += 1
    return min(max(budget, lo), hi)


def temperature_class(params) -> int:
    """Which acceptance statistics a request's rounds feed and read: 0 greedy, then sampled at
    T <= 0.5, T <= 1 and T > 1. A draft agrees with a sampled target far less often than with
    its argmax, and less the hotter the sampling: one engine-wide estimate would give greedy
    rows too short a K and sampled rows too long a one."""
    if params is None or params.greedy:
        return 0
    t = params.temperature
    return 1 if t <= 0.5 else 2 if t <= 1.0 else 3


@dataclass
class AcceptanceCounts:
    """Engine-wide acceptance of one temperature class: positions observed and accepted, and per
    draft position j = 1..k_max the rounds that tried j (positions before it accepted) and the
    rounds that accepted it."""

    k_max: int
    tried: int = 0
    accepted: int = 0
    depth_tried: list = field(default_factory=list)
    depth_accepted: list = field(default_factory=list)

    def __post_init__(self):
        self.depth_tried = self.depth_tried or [0] * self.k_max
        self.depth_accepted = self.depth_accepted or [0] * self.k_max

    def record(self, drafted: int, accepted: int) -> None:
        self.tried += accepted + (accepted < drafted)
        self.accepted += accepted
        for j in range(min(accepted + 1, drafted, self.k_max)):  # positions 1..accepted, and the rejected one
            self.depth_tried[j] += 1
            self.depth_accepted[j] += j < accepted


PROBE_EVERY = 8  # a sequence left without speculation drafts one token every this many rounds


@dataclass
class AdaptiveK:
    """Per-sequence K from its measured acceptance (an EWMA of per-position acceptance that
    starts from the engine-wide estimate of its temperature class) and measured draft-step and
    verify costs. With allow_zero, K may be 0: the row decodes plainly this round, because at the
    measured costs and acceptance speculating would commit fewer tokens per second than not; such
    a sequence still drafts one token every PROBE_EVERY rounds, so its estimate keeps up with it."""

    k_max: int
    init_acceptance: float = 0.6
    weight: float = 0.3  # EWMA weight of one observed position
    allow_zero: bool = False
    verify: LinearCost = field(default_factory=LinearCost)  # seconds of a verify step vs drafted tokens per row
    draft_step: Ewma = field(default_factory=Ewma)  # seconds of one draft step (batched over the rows)
    per_seq: dict = field(default_factory=dict)  # seq_id -> acceptance estimate
    classes: dict = field(default_factory=dict)  # temperature class -> AcceptanceCounts
    class_of: dict = field(default_factory=dict)  # seq_id -> its temperature class (0 when not registered)
    idle_rounds: dict = field(default_factory=dict)  # seq_id -> rounds in a row it was given K = 0
    chosen: list = field(default_factory=list)  # how often each K in 0..k_max was chosen (k_for)

    def __post_init__(self):
        self.chosen = [0] * (self.k_max + 1)

    def register(self, seq_id: int, params) -> None:
        """A new sequence: its rounds feed and read its temperature class's statistics."""
        self.class_of[seq_id] = temperature_class(params)

    def counts(self, cls: int = 0) -> AcceptanceCounts:
        c = self.classes.get(cls)
        if c is None:
            c = self.classes[cls] = AcceptanceCounts(self.k_max)
        return c

    def engine_acceptance(self, cls: int = 0) -> float:
        c = self.counts(cls)
        return (c.accepted + PRIOR_POSITIONS * self.init_acceptance) / (c.tried + PRIOR_POSITIONS)

    def acceptance(self, seq_id: int) -> float:
        return self.per_seq.get(seq_id, self.engine_acceptance(self.class_of.get(seq_id, 0)))

    def record(self, seq_id: int, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.counts(self.class_of.get(seq_id, 0)).record(drafted, accepted)
        self.per_seq[seq_id] = ewma_acceptance(self.acceptance(seq_id), drafted, accepted, self.weight)

    def profile(self, seq_id: int) -> list[float]:
        """Conditional acceptance of positions 1..k_max for this sequence. Over its temperature
        class, position j is accepted (given 1..j-1 were) at rate (accepted_j + 20 a) /
        (tried_j + 20), a the class's per-position acceptance: the geometric model until positions
        are measured. Measured, acceptance is not geometric: a draft that got j tokens right is in
        an easy stretch and is right at j+1 more often than at position 1. The sequence's own
        estimate scales the profile by how it compares with its class's."""
        cls = self.class_of.get(seq_id, 0)
        scale = self.acceptance(seq_id) / self.engine_acceptance(cls)
        return [scale * c for c in self.class_profile(cls)]

    def forget(self, seq_id: int) -> None:
        for d in (self.per_seq, self.class_of, self.idle_rounds):
            d.pop(seq_id, None)

    def class_profile(self, cls: int) -> list[float]:
        """Conditional acceptance of positions 1..k_max over a temperature class (no sequence's
        own estimate in it)."""
        c, a = self.counts(cls), self.engine_acceptance(cls)
        return [(acc + PRIOR_POSITIONS * a) / (tried + PRIOR_POSITIONS) for acc, tried in zip(c.depth_accepted, c.depth_tried)]

    def k_for(self, seq_id: int) -> int:
        """K for this sequence's next round; k_max until both costs have been measured. K = 0 only
        where speculation does not pay for the sequence's temperature class as a whole and not
        for the sequence itself: one sequence's short run of rejections (its EWMA is quick to
        fall) must not switch it off."""
        if not self.verify.known or self.draft_step.value is None:
            k = self.k_max
        else:
            d, profile = self.draft_step.value, self.profile(seq_id)
            k = choose_k(profile, self.k_max, d, self.verify, k_min=0 if self.allow_zero else 1)
            if k == 0 and choose_k(self.class_profile(self.class_of.get(seq_id, 0)), self.k_max, d, self.verify,
                                   k_min=0) > 0:
                k = choose_k(profile, self.k_max, d, self.verify)  # the class pays: at least one token
        if k == 0:
            idle = self.idle_rounds.get(seq_id, 0) + 1
            self.idle_rounds[seq_id] = idle
            if idle % PROBE_EVERY == 0:
                k = 1
        else:
            self.idle_rounds.pop(seq_id, None)
        self.chosen[k] += 1
        return k

    def k_for_cached(self, seq_id: int) -> int:
        """How many tokens of a cached SSD speculation (drafted at depth k_max while the previous
        round was verified) to verify: its draft steps are already paid, off the critical path,
        so only the verify's cost counts. k_max until the verify cost has been measured."""
        if not self.verify.known:
            return self.k_max
        return choose_k(self.profile(seq_id), self.k_max, 0.0, self.verify)
