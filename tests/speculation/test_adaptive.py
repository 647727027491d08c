"""The adaptive speculation rules (docs/algorithm.md section 7): K choice, acceptance EWMA, the
verify cost fit, JIT-or-backup and the fan-out budget, plus the draft's p_min stop."""
import pytest

from ssd.config import SamplingParams
from ssd.speculation.adaptive import (PROBE_EVERY, AdaptiveK, LinearCost, choose_k, ewma_acceptance, expected_tokens,
                                      expected_tokens_profile, next_budget, prefer_jit, temperature_class)


def test_expected_tokens_is_the_geometric_sum():
    assert expected_tokens(0.5, 0) == pytest.approx(1.0)
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(0.8, 2) == pytest.approx(1 + 0.8 + 0.64)


def test_choose_k_maximises_tokens_per_second():
    flat = lambda k: 1.0  # noqa: E731 - a verify that costs the same for any k
    # free drafting and a flat verify: the longest speculation always wins
    assert choose_k(0.5, 6, 0.0, flat) == 6
    # alpha = 0.5, draft step 0.5: rates k=1 1.5/1.5=1.0, k=2 1.75/2=0.875 -> 1
    assert choose_k(0.5, 6, 0.5, flat) == 1
    # alpha = 0.9, draft step 0.1: k=1 1.9/1.1=1.727, k=3 3.439/1.3=2.645, k=6 5.217/1.6=3.26, k=8 6.13/1.8=3.41
    assert choose_k(0.9, 8, 0.1, flat) == 8
    # alpha = 0.8, draft step 0.2: k=2 2.44/1.4=1.743, k=3 2.952/1.6=1.845, k=4 3.362/1.8=1.868, k=5 3.689/2=1.845
    assert choose_k(0.8, 6, 0.2, flat) == 4
    # a verify whose cost grows with k pushes K down (same alpha and draft step: 4 -> 3):
    # k=2 2.44/1.6=1.525, k=3 2.952/1.9=1.554, k=4 3.362/2.2=1.528
    assert choose_k(0.8, 6, 0.2, lambda k: 1.0 + 0.1 * k) == 3


def test_expected_tokens_from_a_profile_of_conditional_acceptance():
    assert expected_tokens_profile([0.5, 0.5, 0.5], 3) == pytest.approx(expected_tokens(0.5, 3))
    assert expected_tokens_profile([0.4, 0.8, 0.8], 3) == pytest.approx(1 + 0.4 + 0.32 + 0.256)
    assert expected_tokens_profile([0.4, 0.8, 0.8], 1) == pytest.approx(1.4)
    # deep positions accepted more often than the first make a deeper K pay (flat verify, 0.15 per
    # draft step): geometric k=1 1.4/1.15=1.217, k=2 1.56/1.3=1.2; profile k=3 2.084/1.45=1.437,
    # k=4 2.376/1.6=1.485
    flat = lambda k: 1.0  # noqa: E731
    assert choose_k(0.4, 4, 0.15, flat) == 1 and choose_k([0.4, 0.9, 0.9, 0.9], 4, 0.15, flat) == 4


def test_depth_profile_is_measured_per_position_and_scaled_per_sequence():
    """Position j's acceptance given 1..j-1 accepted is counted over the rounds that reached j;
    unmeasured positions keep the engine-wide per-position estimate."""
    ak = AdaptiveK(k_max=4, init_acceptance=0.5)
    assert ak.profile(1) == pytest.approx([0.5] * 4)  # nothing measured: the geometric model
    ak.record(1, drafted=4, accepted=2)  # positions 1, 2 accepted, 3 rejected, 4 not tried
    ak.record(1, drafted=2, accepted=0)  # position 1 rejected
    assert ak.counts().depth_tried == [2, 1, 1, 0] and ak.counts().depth_accepted == [1, 1, 0, 0]
    for _ in range(100):  # a draft that, once right at position 1, is right at 2..4 as well
        ak.record(2, drafted=4, accepted=0)
        ak.record(2, drafted=4, accepted=0)
        ak.record(2, drafted=4, accepted=0)
        ak.record(3, drafted=4, accepted=4)
    a = ak.engine_acceptance()
    prof = ak.profile(4)  # a new sequence: the engine-wide profile
    assert prof[0] == pytest.approx((101 + 20 * a) / (402 + 20))
    assert prof[1] == pytest.approx((101 + 20 * a) / (101 + 20))
    assert prof[1] > 0.9 > 0.5 > prof[0]
    assert ak.profile(3)[1] > prof[1] > ak.profile(2)[1]  # each sequence's own acceptance scales it
    ak.verify.observe(1, 1.0)
    ak.verify.observe(4, 1.0)
    ak.draft_step.observe(0.15)
    # the geometric model with the same per-position acceptance (about 0.57) stops at 2; the
    # measured profile (about 0.3, then 0.95 at each later position) drafts 4
    assert choose_k(ak.acceptance(4), 4, 0.15, ak.verify) == 2
    assert ak.k_for(4) == 4 and ak.k_for_cached(4) == 4


def test_ewma_acceptance_counts_accepted_and_the_rejected_position():
    a = ewma_acceptance(0.5, drafted=3, accepted=1, weight=0.5)  # one accept (0.75), one reject (0.375)
    assert a == pytest.approx(0.375)
    assert ewma_acceptance(0.5, drafted=2, accepted=2, weight=0.5) == pytest.approx(0.875)  # no reject seen


def test_linear_cost_fits_intercept_and_slope():
    c = LinearCost(decay=1.0)
    for n in (1, 2, 3, 4):
        c.observe(n, 0.010 + 0.002 * n)
    assert c.coefficients() == pytest.approx((0.010, 0.002))
    flat = LinearCost()
    flat.observe(3, 0.5)
    assert flat(1) == pytest.approx(0.5) and flat(6) == pytest.approx(0.5)  # one width seen: no slope


def test_adaptive_k_starts_at_k_max_then_follows_each_sequence():
    ak = AdaptiveK(k_max=6, init_acceptance=0.6)
    assert ak.k_for(1) == 6  # costs not yet measured
    ak.draft_step.observe(0.2)
    ak.verify.observe(6, 1.0)
    for _ in range(10):
        ak.record(1, drafted=6, accepted=6)  # sequence 1 accepts everything
        ak.record(2, drafted=6, accepted=0)  # sequence 2 nothing
    assert ak.acceptance(1) > 0.95 and ak.acceptance(2) < 0.05
    assert ak.k_for(1) == 6 and ak.k_for(2) == 1
    # a new sequence starts from the engine-wide estimate (60 of 130 observed positions + prior)
    assert ak.acceptance(3) == pytest.approx((60 + 20 * 0.6) / (70 + 20))
    ak.forget(1)
    assert ak.acceptance(1) == ak.acceptance(3)


def test_cached_speculations_are_cut_by_the_verify_cost_alone():
    """A cached speculation's draft steps are already paid: its depth follows acceptance and the
    verify's slope only, so it is never shorter than a JIT one for the same sequence."""
    ak = AdaptiveK(k_max=6, init_acceptance=0.6)
    ak.draft_step.observe(0.05)
    assert ak.k_for_cached(1) == 6  # verify cost not yet measured
    ak.verify.observe(1, 0.100)
    ak.verify.observe(6, 0.200)  # 20 ms per verified token over a 80 ms base
    for _ in range(10):
        ak.record(1, drafted=6, accepted=0)  # alpha -> 0.02
    # a new sequence starts from the engine-wide estimate; its best depth maximises E(k) / verify(k)
    # with no draft term
    a = ak.acceptance(3)
    rates = {k: expected_tokens(a, k) / (0.080 + 0.020 * k) for k in range(1, 7)}
    assert ak.k_for_cached(3) == max(rates, key=rates.get)
    assert ak.k_for_cached(1) == 1 and ak.k_for_cached(3) >= ak.k_for(3)
    for _ in range(10):
        ak.record(2, drafted=6, accepted=6)
    assert ak.k_for_cached(2) == 6


def test_prefer_jit_compares_tokens_per_second_of_the_step():
    # JIT: (2*3 + 2*2.5) / (0.05 + 0.1) = 73.3 tok/s; backup: (6 + 2*1.2) / 0.1 = 84 tok/s -> backup
    assert not prefer_jit(2, 2, 3.0, 2.5, 1.2, 0.05, 0.0, 0.1)
    # a faster JIT: (6 + 5) / 0.12 = 91.7 > 84 -> JIT
    assert prefer_jit(2, 2, 3.0, 2.5, 1.2, 0.02, 0.0, 0.1)
    # the backup's own cost counts per missed row: (6 + 2.4) / (0.1 + 2 * 0.01) = 70 < 73.3 -> JIT
    assert prefer_jit(2, 2, 3.0, 2.5, 1.2, 0.05, 0.01, 0.1)


def test_next_budget_keeps_the_build_within_the_verify():
    assert next_budget(8, build_s=0.12, verify_s=0.10, lo=1, hi=12) == 7  # build too slow: one branch less
    assert next_budget(8, build_s=0.05, verify_s=0.10, lo=1, hi=12) == 9  # room: one more
    assert next_budget(8, build_s=0.09, verify_s=0.10, lo=1, hi=12) == 8  # within (0.8, 1] of the verify: hold
    assert next_budget(12, build_s=0.01, verify_s=0.10, lo=1, hi=12) == 12  # bounded above
    assert next_budget(1, build_s=0.50, verify_s=0.10, lo=1, hi=12) == 1  # and below


def test_draft_p_min_stops_unconfident_rows(small_pair):
    """The JIT draft stops a row before a position whose top probability is below p_min, and
    honours per-sequence lengths; p_min = 0 drafts K."""
    from ssd.config import SamplingParams, SpeculationConfig
    from ssd.engine.draft_runner import DraftRunner
    from ssd.models.loader import load_model

    _, d_dir, _ = small_pair
    draft, _ = load_model(d_dir)
    greedy = SamplingParams()
    lengths = {}
    for p_min in (0.0, 0.99):
        runner = DraftRunner(draft, SpeculationConfig(num_speculative_tokens=4, p_min=p_min), 4, 64)
        for i in range(3):
            runner.add(i, [0, 1, 2, i], greedy)
        out = runner.jit([0, 1, 2], lengths={2: 2})
        lengths[p_min] = [len(out[i][0]) for i in range(3)]
    assert lengths[0.0] == [4, 4, 2]
    assert lengths[0.99] == [1, 1, 1]  # a 4-token vocabulary's draft is never 99% sure twice in a row


def test_adaptive_bench_runs_every_fixed_k_and_the_ablations():
    from ssd.benchmarks.adaptive import ratios, systems

    runs = systems(["sd", "ssd"], [1, 2], 4, 0.5)
    labels = {m: [label for mode, label, _ in runs if mode == m] for m in ("sd", "ssd")}
    assert labels["sd"] == ["K=1", "K=2", "adaptive", "adaptive p_min=0.5"]  # SD has no cached speculations
    assert labels["ssd"] == ["K=1", "K=2", "adaptive", "adaptive, cut cached", "adaptive p_min=0.5"]
    spec = {label: s for mode, label, s in runs if mode == "ssd"}
    assert spec["adaptive, cut cached"].cut_cached and not spec["adaptive"].cut_cached
    assert spec["adaptive, cut cached"].adaptive and spec["adaptive"].num_speculative_tokens == 4
    rows = [{"mode": "ssd", "label": label, "adaptive": spec[label].adaptive, "decode_tokens_per_s": tps}
            for label, tps in (("K=1", 10.0), ("K=2", 20.0), ("adaptive", 25.0), ("adaptive, cut cached", 18.0))]
    ratios(rows)
    assert [r["vs_best_fixed"] for r in rows] == [0.5, 1.0, 1.25, 0.9] and rows[0]["best_fixed"] == "K=2"


def test_adaptive_bench_ratios_over_repeats_pair_runs_of_the_same_repeat():
    """With --repeats, each ratio is the median of the ratios within a repeat, not the ratio of
    the medians; the best fixed K is the one with the highest median."""
    from ssd.benchmarks.adaptive import ratios

    def row(mode, label, adaptive, per):
        return {"mode": mode, "label": label, "adaptive": adaptive, "decode_tokens_per_s": sorted(per)[1],
                "decode_tokens_per_s_repeats": per}

    rows = [row("sd", "K=1", False, [10.0, 20.0, 12.0]), row("sd", "K=2", False, [11.0, 10.0, 16.0]),
            row("sd", "adaptive", True, [12.0, 15.0, 16.0]), row("ssd", "K=1", False, [12.0, 15.0, 16.0]),
            row("ssd", "adaptive", True, [24.0, 15.0, 8.0])]
    ratios(rows)
    sd_ad, ssd_ad = rows[2], rows[4]
    assert sd_ad["best_fixed"] == "K=1"  # medians 12 (K=1) and 11 (K=2)
    assert sd_ad["vs_best_fixed"] == pytest.approx(1.2)  # 1.2, 0.75, 1.33 within repeats; medians' ratio 1.25
    assert sd_ad["vs_best_fixed_range"] == pytest.approx([0.75, 16 / 12])
    assert ssd_ad["vs_sd"] == pytest.approx(1.0) and ssd_ad["vs_sd_range"] == pytest.approx([0.5, 2.0])
    assert rows[0]["vs_best_fixed"] == 1.0
    rows[1]["decode_tokens_per_s_repeats"] = [11.0, 10.0]
    with pytest.raises(ValueError):
        ratios(rows)


def test_no_speculation_when_it_does_not_pay():
    """k_min 0 admits a plain decode row: chosen when the first position is accepted too rarely
    to pay for its draft step and the wider verify, never when it pays."""
    verify = lambda k: 1.0 + 0.05 * k  # noqa: E731
    # alpha 0.1, draft step 0.1: k=1 1.1/1.15 = 0.957 < k=0 1/1 -> 0
    assert choose_k(0.1, 4, 0.1, verify, k_min=0) == 0
    assert choose_k(0.1, 4, 0.1, verify) == 1  # without k_min 0 the old floor holds
    # alpha 0.4: k=1 1.4/1.15 = 1.217 > 1 -> speculate
    assert choose_k(0.4, 4, 0.1, verify, k_min=0) >= 1


def test_temperature_classes_keep_their_own_acceptance():
    """Sampled rounds, accepted far less often, do not shorten greedy rows' K, nor do greedy
    rounds lengthen sampled rows'."""
    assert temperature_class(SamplingParams()) == 0
    assert [temperature_class(SamplingParams(temperature=t)) for t in (0.3, 0.8, 1.5)] == [1, 2, 3]
    ak = AdaptiveK(k_max=4, init_acceptance=0.5, allow_zero=True)
    ak.register(1, SamplingParams())
    ak.register(2, SamplingParams(temperature=0.8))
    for _ in range(200):
        ak.record(1, drafted=4, accepted=3)
        ak.record(2, drafted=4, accepted=0)
    assert ak.engine_acceptance(0) > 0.7 and ak.engine_acceptance(2) < 0.1
    ak.register(3, SamplingParams(temperature=0.9))  # a new sampled sequence starts from its class
    assert ak.acceptance(3) == ak.engine_acceptance(2)
    ak.verify.observe(0, 1.0)
    ak.verify.observe(4, 1.2)
    ak.draft_step.observe(0.1)
    assert ak.k_for(1) >= 3 and ak.k_for(3) == 0
    ak.forget(3)
    assert 3 not in ak.class_of and 3 not in ak.idle_rounds


def test_a_sequence_without_speculation_still_probes():
    ak = AdaptiveK(k_max=4, init_acceptance=0.05, allow_zero=True)
    ak.verify.observe(0, 1.0)
    ak.verify.observe(4, 1.4)
    ak.draft_step.observe(0.2)
    ks = [ak.k_for(7) for _ in range(3 * PROBE_EVERY)]
    assert ks.count(1) == 3 and ks.count(0) == 3 * PROBE_EVERY - 3  # one drafted token every PROBE_EVERY rounds
    assert ak.chosen[0] == ks.count(0) and ak.chosen[1] == 3


def test_one_sequences_run_of_rejections_does_not_switch_it_off():
    """K = 0 needs the temperature class as a whole not to pay: a sequence whose own quick EWMA
    collapsed after a few rejections keeps speculating while its class pays."""
    ak = AdaptiveK(k_max=4, init_acceptance=0.5, allow_zero=True)
    ak.register(1, SamplingParams())
    ak.register(2, SamplingParams())
    for _ in range(200):
        ak.record(1, drafted=4, accepted=3)
    for _ in range(8):
        ak.record(2, drafted=4, accepted=0)
    ak.verify.observe(0, 1.0)
    ak.verify.observe(4, 1.2)
    ak.draft_step.observe(0.1)
    assert ak.acceptance(2) < 0.05 and ak.k_for(2) >= 1


def _brute_force(rows, verify, draft_step, plain=0):
    """Every combination of lengths: the best committed tokens per second of a step."""
    import itertools

    best = 0.0
    for ks in itertools.product(*[range(min(cap, len(p)) + 1) for _, p, cap, _ in rows]):
        tokens = plain + sum(expected_tokens_profile(p, k) for (_, p, _, _), k in zip(rows, ks))
        width = plain + sum(k + 1 for k in ks)
        deepest = max([k for (_, _, _, jit), k in zip(rows, ks) if jit] or [0])
        best = max(best, tokens / (verify(width) + draft_step * deepest))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_planned_lengths_are_the_best_of_every_combination(seed):
    """plan_lengths against brute force over all lengths of a small batch: random acceptance
    profiles (falling, rising with depth), caps, JIT and cached rows, verify and draft costs."""
    import random

    from ssd.speculation.adaptive import plan_lengths

    rng = random.Random(seed)
    rows = [(i, [rng.uniform(0.02, 0.98) for _ in range(4)], rng.choice([1, 2, 3, 4]), rng.random() < 0.5)
            for i in range(rng.choice([1, 2, 3, 4]))]
    c0, c1, d = rng.uniform(0.005, 0.05), rng.uniform(0.0, 0.01), rng.uniform(0.0, 0.02)
    verify = lambda n: c0 + c1 * n  # noqa: E731
    plain = rng.choice([0, 0, 2])
    ks, rate = plan_lengths(rows, verify, d, plain)
    assert rate == pytest.approx(_brute_force(rows, verify, d, plain), rel=1e-9)
    # the lengths it returns realise the rate it predicts, each within its row's cap
    tokens = plain + sum(expected_tokens_profile(p, ks[i]) for i, p, _, _ in rows)
    width = plain + sum(ks[i] + 1 for i, *_ in rows)
    deepest = max([ks[i] for i, _, _, jit in rows if jit] or [0])
    assert rate == pytest.approx(tokens / (verify(width) + d * deepest))
    assert all(0 <= ks[i] <= cap for i, _, cap, _ in rows)


def test_a_loaded_batch_speculates_less_than_a_lone_sequence():
    """A verify whose cost grows with its rows: one sequence drafts deep, eight sequences with the
    same acceptance draft little or nothing (each drafted token must pay its share of the wider
    verify), and a flat verify lets every row draft its all."""
    from ssd.speculation.adaptive import plan_lengths

    profile = [0.45, 0.5, 0.5, 0.5]
    verify = lambda n: 0.030 + 0.004 * n  # noqa: E731 - CPU-like: each verified row costs
    alone, _ = plan_lengths([(0, profile, 4, True)], verify, 0.002)
    loaded, _ = plan_lengths([(i, profile, 4, True) for i in range(8)], verify, 0.002)
    assert alone[0] >= 2 and sum(loaded.values()) < 8
    flat, _ = plan_lengths([(i, profile, 4, False) for i in range(8)], lambda n: 0.05, 0.0)
    assert set(flat.values()) == {4}
    # a costly draft step and a JIT row it seldom pays for: no JIT drafting, the cached row verified whole
    mixed, rate = plan_lengths([(0, [0.1] * 4, 4, True), (1, [0.9] * 4, 4, False)], lambda n: 0.03 + 0.001 * n, 0.02)
    assert mixed == {0: 0, 1: 4} and rate == pytest.approx((2 + 0.9 + 0.81 + 0.729 + 0.6561) / 0.036)  # no draft step paid


def test_gate_takes_the_faster_arm_per_load_and_keeps_measuring_the_other():
    """SpeculationGate: each arm measured first, then the faster one by realised tokens per
    second, separately per load class; the slower one re-measured for EXPLORE_STEPS steps of
    every EXPLORE_EVERY."""
    from ssd.speculation.adaptive import SpeculationGate, load_bucket

    assert [load_bucket(n) for n in (1, 2, 3, 4, 7, 8, 16)] == [1, 2, 2, 3, 3, 4, 5]
    g = SpeculationGate()
    speed = {(1, "spec"): 30.0, (1, "plain"): 20.0, (8, "spec"): 15.0, (8, "plain"): 40.0}
    taken = {1: [], 8: []}
    for _ in range(3 * g.EXPLORE_EVERY):
        for n in (1, 8):
            key = g.key(n, [0] * n)
            arm = g.choose(key)
            taken[n].append(arm)
            g.observe(key, arm, tokens=speed[(n, arm)], seconds=1.0)
    assert taken[1][: g.MIN_STEPS] == ["spec"] * g.MIN_STEPS  # speculation is tried first
    assert taken[8][g.MIN_STEPS: 2 * g.MIN_STEPS] == ["plain"] * g.MIN_STEPS  # then plain decoding
    explored = 3 * g.EXPLORE_STEPS
    assert g.MIN_STEPS + 2 * g.EXPLORE_STEPS <= taken[1].count("plain") <= g.MIN_STEPS + 1 + explored
    # the first step after each change of arm is not measured (speculation resumes from a miss)
    for n in (1, 8):
        switches_to = {a: sum(1 for x, y in zip(taken[n], taken[n][1:]) if y == a != x) for a in ("spec", "plain")}
        for a in ("spec", "plain"):
            assert g.arms[g.key(n, [0] * n)][a].steps == taken[n].count(a) - switches_to[a]
    assert taken[8].count("spec") <= g.MIN_STEPS + explored and taken[8].count("plain") >= 3 * g.EXPLORE_EVERY - g.MIN_STEPS - explored
    assert taken[1].count("spec") >= 3 * g.EXPLORE_EVERY - g.MIN_STEPS - 1 - explored
    assert g.rates()["4:0"]["plain"] == pytest.approx(40.0) and g.rates()["1:0"]["spec"] == pytest.approx(30.0)
    # a different temperature mix at the same load is its own class: measured afresh
    assert g.choose(g.key(8, [0, 2])) == "spec"
    # a larger load than one found not to pay starts plain; speculation measured on the schedule only
    big = g.key(16, [0] * 16)
    taken = [g.choose(big) for _ in range(g.EXPLORE_EVERY)]
    assert taken.count("spec") == g.EXPLORE_STEPS and taken[0] == "plain"
    # a smaller one does not: it lies between a class found to pay and one found not to, so it measures both
    mid, taken = g.key(2, [0, 0]), []
    for _ in range(2 * g.MIN_STEPS + 1):
        taken.append(g.choose(mid))
        g.observe(mid, taken[-1], tokens=25.0, seconds=1.0)
    assert taken == ["spec"] * g.MIN_STEPS + ["plain"] * (g.MIN_STEPS + 1)  # the first plain step is not counted
    # a smaller load than one found to pay speculates from its first step, plain measured on the schedule only
    for _ in range(2 * g.MIN_STEPS + 2):
        key = g.key(4, [1] * 4)
        arm = g.choose(key)
        g.observe(key, arm, tokens={"spec": 30.0, "plain": 20.0}[arm], seconds=1.0)
    assert g.winner(g.key(4, [1] * 4)) == "spec" and g.inherited(g.key(2, [1, 1])) == "spec"
    taken = [g.choose(g.key(2, [1, 1])) for _ in range(g.EXPLORE_EVERY)]
    assert taken.count("plain") == g.EXPLORE_STEPS and taken[: g.MIN_STEPS * 2] == ["spec"] * 2 * g.MIN_STEPS
    # neighbours that disagree with the order of loads (a smaller class plain, a larger one speculating) settle nothing
    for n, fast in ((1, "plain"), (16, "spec")):
        key = g.key(n, [2] * n)
        for arm in ["spec", "plain"] * g.MIN_STEPS:  # measured as they would be (each inherits from the other)
            g.observe(key, arm, tokens=30.0 if arm == fast else 20.0, seconds=1.0)
    assert g.inherited(g.key(4, [2] * 4)) is None and g.choose(g.key(4, [2] * 4)) == "spec"


def test_the_gate_measures_a_step_to_the_start_of_the_next_and_never_idle_time():
    """AdaptiveK.step_done / step_begins: a step is timed from its start to the next step's start
    (what happens between steps, e.g. streaming tokens out, counts against its arm); the last
    step before the engine idles is timed to its own end, so a pause between requests is never
    charged to either arm."""
    from ssd.speculation.adaptive import AdaptiveK

    ad = AdaptiveK(4)
    key = ad.gate.key(1, [0])
    spec = ("spec", key)
    ad.step_begins(0.0)  # nothing pending: nothing measured
    ad.step_done(spec, tokens=3, started=0.0, now=0.1, more=True)
    assert key not in ad.gate.arms  # not yet: the period runs to the next step
    ad.step_begins(0.15)
    arm = ad.gate.arms[key]["spec"]
    assert arm.steps == 1 and arm.seconds == pytest.approx(0.15) and arm.tokens == 3
    ad.step_done(spec, tokens=2, started=0.2, now=0.3, more=False)  # the engine goes idle
    assert arm.steps == 2 and arm.seconds == pytest.approx(0.98 * 0.15 + 0.1)
    ad.step_begins(60.0)  # a minute later: the idle time is not charged
    assert arm.steps == 2 and arm.seconds == pytest.approx(0.98 * 0.15 + 0.1)


def test_gate_explores_a_losing_arm_ever_less_and_a_recovering_one_at_the_base_rate():
    from ssd.speculation.adaptive import SpeculationGate

    g = SpeculationGate()
    key = g.key(1, [0])
    speed = {"spec": 20.0, "plain": 30.0}  # speculation a third slower: backs off
    taken = []
    for _ in range(1500):
        arm = g.choose(key)
        taken.append(arm)
        g.observe(key, arm, tokens=speed[arm], seconds=1.0)
    starts = [i for i in range(2 * g.MIN_STEPS + 1, len(taken)) if taken[i] == "spec" and taken[i - 1] == "plain"]
    assert [b - a for a, b in zip(starts, starts[1:])] == [256, 512]  # every window 8 steps, the gaps doubling
    assert taken.count("spec") == g.MIN_STEPS + 3 * g.EXPLORE_STEPS
    # within the margin: explored at the base rate
    g2, key2 = SpeculationGate(), g.key(1, [0])
    taken = []
    for _ in range(600):
        arm = g2.choose(key2)
        taken.append(arm)
        g2.observe(key2, arm, tokens={"spec": 29.0, "plain": 30.0}[arm], seconds=1.0)
    starts = [i for i in range(2 * g2.MIN_STEPS + 1, len(taken)) if taken[i] == "spec" and taken[i - 1] == "plain"]
    assert {b - a for a, b in zip(starts, starts[1:])} == {g2.EXPLORE_EVERY}
    # a losing arm that turns faster is found at its next exploration and taken
    speed = {"spec": 40.0, "plain": 30.0}
    for _ in range(2048):
        arm = g.choose(key)
        g.observe(key, arm, tokens=speed[arm], seconds=1.0)
    assert g.winner(key) == "spec" and g.choose(key) == "spec"
