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


def plan_lengths(rows, verify_s, draft_step_s: float, plain: int = 0):
    """Speculation lengths for one batched step, chosen together to maximise the step's
    committed tokens per second: sum over rows of E_i(k_i) / (verify_s(R) + draft_step_s * m),
    R = plain + sum (k_i + 1) the rows of the verify forward and m the deepest length among the
    rows the draft serves just in time (its steps run batched over them). rows: (seq_id,
    profile, cap, jit): conditional acceptance of positions 1..cap, the most it may verify (a
    cached speculation's length, or K), whether its tokens must be drafted now. plain: rows that
    speculate nothing anyway (AR requests). Every row commits at least one token; a row's next
    position adds its probability of being reached and accepted, which only falls with depth.
    For each m in 0..max cap the positions are added in order of that gain (JIT rows at most m
    deep) and the best prefix kept: with a verify cost linear in R this is the optimum over all
    lengths; ties go to fewer tokens. Returns ({seq_id: k}, predicted committed tokens per second)."""
    import heapq

    n_rows = plain + len(rows)
    best = ({seq_id: 0 for seq_id, *_ in rows}, n_rows / max(verify_s(n_rows), 1e-9))
    deepest = max([min(cap, len(profile)) for _, profile, cap, jit in rows if jit] or [0])
    for m in range(deepest + 1):  # the JIT draft runs m steps
        draft_s = draft_step_s * m
        heap = []  # (-gain of the row's next position, row, reach so far, how deep it may go)
        for i, (seq_id, profile, cap, jit) in enumerate(rows):
            depth = min(cap, len(profile), m if jit else cap)
            if depth > 0:
                a = min(max(profile[0], ALPHA_FLOOR), ALPHA_CEIL)
                heapq.heappush(heap, (-a, i, a, depth))
        tokens, width, order, got = float(n_rows), n_rows, [], [0] * len(rows)
        best_here, best_n = -1.0, 0
        while heap:
            neg_gain, i, reach, depth = heapq.heappop(heap)
            order.append(i)
            got[i] += 1
            tokens, width = tokens - neg_gain, width + 1
            rate = tokens / max(verify_s(width) + draft_s, 1e-9)
            if rate > best_here * (1 + 1e-9):
                best_here, best_n = rate, len(order)
            if got[i] < depth:
                nxt = reach * min(max(rows[i][1][got[i]], ALPHA_FLOOR), ALPHA_CEIL)
                heapq.heappush(heap, (-nxt, i, nxt, depth))
        if best_here > best[1] * (1 + 1e-9):
            ks = {seq_id: 0 for seq_id, *_ in rows}
            for i in order[:best_n]:
                ks[rows[i][0]] += 1
            best = (ks, best_here)
    return best


def load_bucket(n: int) -> int:
    """Rows of a step -> its load class: 1, 2-3, 4-7, 8-15, ... (speculation pays differently at
    each: the verify's cost per row and the draft's share of the machine grow with the batch)."""
    return max(int(n), 1).bit_length()


@dataclass
class ArmRate:
    """Decayed committed tokens and seconds of the steps taken with one arm (a step's tokens vary
    from 1 to K + 1 per row: about the last 50 steps make the rate)."""

    decay: float = 0.98
    tokens: float = 0.0
    seconds: float = 0.0
    steps: int = 0

    def observe(self, tokens: float, seconds: float) -> None:
        self.tokens = self.decay * self.tokens + tokens
        self.seconds = self.decay * self.seconds + seconds
        self.steps += 1

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class SpeculationGate:
    """Whether to speculate at all in a step, from realised tokens per second. The length model
    sees the verify's and the JIT draft's cost, not what the draft's background work (cache
    builds, q rows, a second process on the same cores) does to the rest of the step; this
    measures the whole: per load class (load_bucket of the step's rows) and temperature mix, the
    committed tokens per second of steps that speculated and of steps that decoded every row
    plainly (the first step after a change of arm left out). Each arm is tried for MIN_STEPS
    steps first; then the faster one is taken, and the
    other re-measured for EXPLORE_STEPS steps every EXPLORE_EVERY steps of that class (so a
    change in load or acceptance is seen), half as often after each exploration that finds it
    slower again by more than MARGIN (down to once every MAX_EXPLORE_EVERY steps). Speculation pays less the larger the batch, so a new
    class starts from what its neighbours of the same mix found where that settles it: plain
    when the nearest smaller measured class found speculation not to pay, speculating when the
    nearest larger one found it to pay; it then measures the other arm on the exploration
    schedule only (a batch that fills up or drains passes through every class, and measuring
    both arms in each would spend most of a short burst on the slower one). A step in which speculation was
    off costs what plain decoding costs: at worst the exploration's share of steps runs at the
    slower arm's speed."""

    MIN_STEPS = 8
    EXPLORE_EVERY = 128
    EXPLORE_STEPS = 8
    # an arm whose exploration found it slower again by more than MARGIN (its rate over that
    # exploration's own steps) is explored half as often next time (up to every MAX_EXPLORE_EVERY
    # steps): a losing arm costs ever less, while one that comes back within the margin, or
    # ahead, is watched at the base rate again until its decayed rate catches up
    MARGIN = 0.05
    MAX_EXPLORE_EVERY = 2048

    def __init__(self):
        self.arms: dict = {}  # (bucket, mix) -> {"spec": ArmRate, "plain": ArmRate}
        self.seen: dict = {}  # (bucket, mix) -> steps decided
        self.last: dict = {}  # (bucket, mix) -> the arm its previous step took
        self.switched: dict = {}  # (bucket, mix) -> its current step is the first after a change of arm
        self.decisions = {"spec": 0, "plain": 0}
        self.window: dict = {}  # (bucket, mix) -> the step at which its next exploration starts
        self.every: dict = {}  # (bucket, mix) -> steps between its explorations now
        self.exploring: dict = {}  # (bucket, mix) -> its current step explores the slower arm
        self.explored: dict = {}  # (bucket, mix) -> (tokens, seconds) measured by its current exploration

    def key(self, n_rows: int, classes) -> tuple:
        return load_bucket(n_rows), tuple(sorted(set(classes)))

    def winner(self, key) -> str | None:
        """The faster arm of a class once both are measured, else None."""
        arms = self.arms.get(key)
        if arms is None or min(a.steps for a in arms.values()) < self.MIN_STEPS:
            return None
        return "spec" if arms["spec"].rate >= arms["plain"].rate else "plain"

    def inherited(self, key) -> str | None:
        """The arm a class not yet measured takes from its neighbours of the same temperature mix:
        "plain" if the nearest smaller measured class found plain faster, "spec" if the nearest
        larger one found speculation faster, else (or if both hold: noise) None."""
        bucket, mix = key
        known = {b: w for (b, m) in self.arms if m == mix and (w := self.winner((b, m))) is not None}
        below = [b for b in known if b < bucket]
        above = [b for b in known if b > bucket]
        plain = bool(below) and known[max(below)] == "plain"
        spec = bool(above) and known[min(above)] == "spec"
        return None if plain == spec else "plain" if plain else "spec"

    def choose(self, key) -> str:
        arms = self.arms.setdefault(key, {"spec": ArmRate(), "plain": ArmRate()})
        t = self.seen.get(key, 0)
        self.seen[key] = t + 1
        best = self.winner(key)
        if best is None:
            best = self.inherited(key)
        if best is None:
            arm = "spec" if arms["spec"].steps < self.MIN_STEPS else "plain"
        else:
            other = "plain" if best == "spec" else "spec"
            start = self.window.setdefault(key, self.EXPLORE_EVERY - self.EXPLORE_STEPS)
            if t >= start + self.EXPLORE_STEPS:  # an exploration ended: when is the next one
                every = self.every.get(key, self.EXPLORE_EVERY)
                tokens, seconds = self.explored.pop(key, (0.0, 0.0))  # what this exploration itself saw
                seen = tokens / seconds if seconds > 0 else arms[other].rate
                losing = self.winner(key) == best and seen < arms[best].rate * (1 - self.MARGIN)
                every = min(2 * every, self.MAX_EXPLORE_EVERY) if losing else self.EXPLORE_EVERY
                self.every[key] = every
                start = self.window[key] = start + self.EXPLORE_STEPS + every - self.EXPLORE_STEPS
            arm = other if start <= t < start + self.EXPLORE_STEPS else best
            self.exploring[key] = arm == other
        self.switched[key] = self.last.get(key, arm) != arm
        self.last[key] = arm
        self.decisions[arm] += 1
        return arm

    def observe(self, key, arm: str, tokens: int, seconds: float) -> None:
        """A step of this class took `arm`. The first step after a change of arm is not counted:
        speculation resumed after plain steps starts from a miss (no cache was built), which says
        nothing of what speculating costs while it goes on."""
        if self.switched.pop(key, False):
            return
        self.arms.setdefault(key, {"spec": ArmRate(), "plain": ArmRate()})[arm].observe(tokens, seconds)
        if self.exploring.get(key):
            t, s = self.explored.get(key, (0.0, 0.0))
            self.explored[key] = (t + tokens, s + seconds)

    def rates(self) -> dict:
        return {f"{b}:{','.join(map(str, mix))}": {a: round(r.rate, 2) for a, r in arms.items()}
                for (b, mix), arms in self.arms.items()}


@dataclass
class AdaptiveK:
    """Per-sequence K from its measured acceptance (an EWMA of per-position acceptance that
    starts from the engine-wide estimate of its temperature class) and measured draft-step and
    verify costs, planned for the whole step (plan_lengths: the verify's cost grows with the rows
    of the batch, so at a large batch each drafted token must be likelier to pay). With
    allow_zero, K may be 0: the row decodes plainly this round, because at the measured costs
    and acceptance speculating would commit fewer tokens per second than not; such a sequence
    still drafts one token every PROBE_EVERY rounds, so its estimate keeps up with it. The gate
    (SpeculationGate) turns speculation off for a whole step where it measurably does not pay."""

    k_max: int
    init_acceptance: float = 0.6
    weight: float = 0.3  # EWMA weight of one observed position
    allow_zero: bool = False
    verify: LinearCost = field(default_factory=LinearCost)  # seconds of a verify step vs the rows it verifies
    draft_step: Ewma = field(default_factory=Ewma)  # seconds of one draft step (batched over the rows)
    per_seq: dict = field(default_factory=dict)  # seq_id -> acceptance estimate
    classes: dict = field(default_factory=dict)  # temperature class -> AcceptanceCounts
    class_of: dict = field(default_factory=dict)  # seq_id -> its temperature class (0 when not registered)
    idle_rounds: dict = field(default_factory=dict)  # seq_id -> rounds in a row it was given K = 0
    chosen: list = field(default_factory=list)  # how often each K in 0..k_max was chosen (k_for)
    planned: dict = field(default_factory=dict)  # seq_id -> K of this step's plan (plan())
    predicted: float | None = None  # committed tokens per second the last plan expected
    gate: SpeculationGate | None = field(default_factory=SpeculationGate)  # None: every step speculates
    pending: tuple | None = None  # the last step (arm_key, tokens, started), measured when the next one begins

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
        for d in (self.per_seq, self.class_of, self.idle_rounds, self.planned):
            d.pop(seq_id, None)

    def class_profile(self, cls: int) -> list[float]:
        """Conditional acceptance of positions 1..k_max over a temperature class (no sequence's
        own estimate in it)."""
        c, a = self.counts(cls), self.engine_acceptance(cls)
        return [(acc + PRIOR_POSITIONS * a) / (tried + PRIOR_POSITIONS) for acc, tried in zip(c.depth_accepted, c.depth_tried)]

    @property
    def measured(self) -> bool:
        return self.verify.known and self.draft_step.value is not None

    def speculate(self, seq_ids, plain: int = 0) -> tuple:
        """Whether this step speculates at all (the gate, per load class and temperature mix of
        its rows); returns (arm, gate key) for step_done."""
        if self.gate is None:
            return "spec", None
        key = self.gate.key(len(seq_ids) + plain, (self.class_of.get(i, 0) for i in seq_ids))
        return self.gate.choose(key), key

    def step_begins(self, now: float) -> None:
        """The engine starts a step (before admitting new requests): the previous one, if the
        engine ran on, is measured from its start to now. So the gate sees the loop's whole
        period: what happens between steps (the service handing the tokens to their streams; the
        draft process's background work slowing that down on shared cores) counts against the
        arm that caused it, as the clients feel it."""
        if self.pending is not None:
            arm_key, tokens, started = self.pending
            self.pending = None
            self._observe(arm_key, tokens, now - started)

    def step_done(self, arm_key: tuple, tokens: int, started: float, now: float, more: bool) -> None:
        """A step taken with arm_key (from speculate) that started at `started` committed
        `tokens`. With more sequences running it is measured when the next step begins
        (step_begins); the last step before the engine goes idle is measured to `now`, so idle
        time between requests never counts."""
        if more:
            self.pending = (arm_key, tokens, started)
        else:
            self.pending = None
            self._observe(arm_key, tokens, now - started)

    def _observe(self, arm_key: tuple, tokens: int, seconds: float) -> None:
        arm, key = arm_key
        if self.gate is not None:
            self.gate.observe(key, arm, tokens, seconds)

    def plan(self, jit_ids, cached: dict | None = None, plain: int = 0) -> None:
        """Lengths for this step's rows, chosen together (plan_lengths): jit_ids are drafted now
        (their draft steps count), cached maps seq_id -> tokens of a speculation already drafted
        (cache, index or n-gram backup: only the verify counts), plain the rows verified with no
        speculation. k_for / k_for_cached read the plan; until both costs are measured there is
        none and they give k_max. With allow_zero a JIT row may get 0; a row whose temperature
        class pays at the plan's margin keeps at least one token (one sequence's short run of
        rejections, which its EWMA follows quickly, must not switch it off)."""
        self.planned, self.predicted = {}, None
        if self.measured:
            self.planned, self.predicted = self._lengths(jit_ids, cached or {}, plain)

    def _lengths(self, jit_ids, cached: dict, plain: int) -> tuple[dict, float]:
        rows = [(i, self.profile(i), self.k_max, True) for i in jit_ids]
        rows += [(i, self.profile(i), n, False) for i, n in cached.items()]
        ks, rate = plan_lengths(rows, self.verify, self.draft_step.value or 0.0, plain)
        c1 = self.verify.coefficients()[1]
        jit_drafting = any(ks[i] for i in jit_ids)
        for i in jit_ids:
            if ks[i] == 0:  # the floor: would the class's first position pay at this plan's rate?
                extra = c1 + (0.0 if jit_drafting else self.draft_step.value)
                first = self.class_profile(self.class_of.get(i, 0))[0]
                if not self.allow_zero or first > rate * extra:
                    ks[i] = 1
        return ks, rate

    def k_for(self, seq_id: int) -> int:
        """K for this sequence's next JIT round: its share of this step's plan (k_max before
        costs are measured; a row the plan did not cover is planned alone). A row given 0 drafts one token
        every PROBE_EVERY rounds all the same."""
        if not self.measured:
            k = self.k_max
        elif seq_id in self.planned:
            k = self.planned[seq_id]
        else:  # not planned with a batch: planned alone
            k = self._lengths([seq_id], {}, 0)[0][seq_id]
        if k == 0:
            idle = self.idle_rounds.get(seq_id, 0) + 1
            self.idle_rounds[seq_id] = idle
            if idle % PROBE_EVERY == 0:
                k = 1
        else:
            self.idle_rounds.pop(seq_id, None)
        self.chosen[k] += 1
        return k

    def k_for_cached(self, seq_id: int, length: int | None = None) -> int:
        """How many tokens of a cached SSD speculation (drafted while the previous round was
        verified) to verify: its draft steps are already paid, off the critical path, so only the
        verify's cost counts (the plan gave it no draft cost). The whole speculation (length, or
        k_max) until the verify cost has been measured; a row the plan did not cover is planned
        alone and keeps at least one token."""
        full = self.k_max if length is None else length
        if not self.verify.known:
            return full
        if seq_id not in self.planned:  # not planned with a batch: planned alone, at least one token
            return max(self._lengths([], {seq_id: full}, 0)[0][seq_id], 1)
        return min(self.planned[seq_id], full)
