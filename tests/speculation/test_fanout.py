import numpy as np
import pytest

from ssd.speculation.fanout import AcceptanceStats, FanOutPlanner, fit_power_law, geometric_fan_out, uniform_fan_out


@pytest.mark.parametrize("budget,k", [(12, 4), (24, 7), (5, 4), (100, 3)])
def test_schedules_sum_to_budget(budget, k):
    for a in (0.2, 0.6, 0.9):
        for r in (0.3, 1.0, 3.0):
            f = geometric_fan_out(budget, k, a, r)
            assert len(f) == k + 1 and sum(f) == budget and min(f) >= 0
    assert uniform_fan_out(budget, k) == sorted(uniform_fan_out(budget, k), reverse=True)
    assert sum(uniform_fan_out(budget, k)) == budget


def test_geometric_shape_matches_closed_form():
    a, r, k = 0.7, 1.0, 4
    f = geometric_fan_out(10_000, k, a, r)
    e = 1 / (1 + r)
    expect = [a ** (i * e) for i in range(k)] + [a ** (k * e) * (1 - a) ** (-e)]
    ratios = np.array(f) / f[0]
    assert np.allclose(ratios, np.array(expect) / expect[0], rtol=1e-2)
    # below depth K the schedule decays geometrically; the bonus depth gets the (1-a)^(-1/(1+r)) boost
    assert f[0] > f[1] > f[2] > f[3]
    assert f[4] > f[3]


def test_geometric_beats_uniform_on_its_objective():
    a, r, k, budget = 0.8, 0.8, 4, 12
    pi = [a**i * (1 - a) for i in range(k)] + [a**k]

    def objective(fs):
        return sum(p * (1 - f ** (-r)) if f > 0 else 0 for p, f in zip(pi, fs))

    assert objective(geometric_fan_out(budget, k, a, r)) >= objective(uniform_fan_out(budget, k)) - 1e-9


def test_power_law_fit_recovers_exponent():
    rng = np.random.default_rng(0)
    r_true = 0.8
    # P(rank >= F) = F^-r for rank in 1.. -> sample ranks by inversion
    u = rng.random(20000)
    ranks = np.floor(u ** (-1 / r_true)).astype(int) - 1  # 0-based
    hist = np.bincount(np.minimum(ranks, 64), minlength=65)
    assert abs(fit_power_law(hist, 1.0) - r_true) < 0.1
    assert fit_power_law(np.zeros(65, dtype=int), 1.5) == 1.5  # too few samples: the prior


def test_planner_keeps_separate_hit_and_miss_statistics():
    p = FanOutPlanner(budget=12, k=4, init_acceptance=0.5)
    for _ in range(200):
        p.stats["hit"].record_round(4, 4, 0)
        p.stats["miss"].record_round(4, 0, 3)
    assert p.stats["hit"].acceptance > 0.9 and p.stats["miss"].acceptance < 0.1
    hit, miss = p.schedule("hit"), p.schedule("miss")
    assert hit[-1] > hit[0]  # nearly always all accepted: mass moves to the bonus depth
    assert miss[0] > miss[-1]  # nearly always rejected at once: mass at depth 0
    assert AcceptanceStats().acceptance == pytest.approx(0.6)
