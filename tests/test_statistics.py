"""The study's statistics on constructed numbers whose answers are known."""

import math

import pytest

from llmstable.statistics import (
    best_lr, grid_edge, holm, lr_sensitivity, next_lr, paired_difference, t975, t_cdf, t_quantile, verdict,
)


def test_t_quantiles_match_the_tables():
    assert t975(1) == pytest.approx(12.706, abs=1e-3)
    assert t975(4) == pytest.approx(2.776, abs=1e-3)
    assert t975(60) == pytest.approx(2.0003, abs=2e-4)
    assert t975(1000) == pytest.approx(1.9623, abs=2e-4)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 29, 31, 45, 200):
        assert t975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-4)


def test_t_distribution_and_quantiles_match_the_tables():
    # Closed forms: one degree of freedom is Cauchy's, two has P(T <= t) = 1/2 + t / (2 sqrt(2 + t^2)).
    for t in (-3.0, 0.0, 0.7, 12.7062):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-14)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-14)
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4) and t_quantile(0.975, 4) == pytest.approx(2.7764,
                                                                                                         abs=1e-4)
    assert t_quantile(1 - 0.05 / 6, 2) == pytest.approx(7.6488, abs=1e-3)  # Bonferroni over 3 arms at 3 seeds
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 6, 31, 200):
        for t in (-4.0, -0.5, 1.3, 9.0):
            assert t_cdf(t, df) == pytest.approx(scipy_stats.t.cdf(t, df), abs=1e-12)
        for p in (0.9, 0.975, 0.99583):
            assert t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9)


def test_holm_steps_down_and_never_lowers_a_later_p():
    # Sorted: 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to 0.06 (adjusted p-values never decrease).
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert holm({"a": 0.6, "b": 0.5}) == {"a": 1.0, "b": 1.0}
    assert holm({}) == {}


def test_a_verdict_needs_the_corrected_p_value_under_alpha():
    d = paired_difference({0: 4.9, 1: 5.88, 2: 3.92}, {0: 5.0, 1: 6.0, 2: 4.0})
    assert verdict(d, 0.01) == "better" and verdict(d, 0.06) == "not distinguishable at 3 seeds"
    worse = paired_difference({0: 5.2, 1: 5.31, 2: 5.19}, {0: 5.0, 1: 5.1, 2: 5.0})
    assert verdict(worse, worse.p_value) == "worse"
    assert verdict(None, None) == "no seed in common"


def test_paired_difference_uses_the_pairs_not_the_spread_of_each_arm():
    # The seeds move both arms by a lot; the arm is better by exactly 0.1, 0.12, 0.08 on each seed.
    baseline = {0: 5.0, 1: 6.0, 2: 4.0}
    arm = {0: 4.9, 1: 5.88, 2: 3.92}
    d = paired_difference(arm, baseline)
    assert d.n == 3 and d.mean == pytest.approx(-0.1)
    assert d.std == pytest.approx(0.02)
    half = 4.302653 * 0.02 / math.sqrt(3)
    assert d.ci95 == pytest.approx((-0.1 - half, -0.1 + half), abs=1e-4)
    # t = 0.1 / (0.02 / sqrt 3) = 8.66 on 2 degrees of freedom: p = 1 - 8.66 / sqrt(2 + 8.66^2)
    t = 0.1 / (0.02 / math.sqrt(3))
    assert d.p_value == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-6)
    # Bonferroni over 3 arms: the 1 - 0.05/3 interval, t(0.99167, 2) = 7.6488
    assert d.interval(1 - 0.05 / 3) == pytest.approx((-0.1 - 7.6488 * 0.02 / math.sqrt(3),
                                                      -0.1 + 7.6488 * 0.02 / math.sqrt(3)), abs=1e-4)


def test_a_single_pair_has_no_interval_and_no_p_value():
    one = paired_difference({0: 4.0, 7: 1.0}, {0: 5.0})
    assert one.n == 1 and one.ci95 is None and one.p_value is None and one.interval(0.95) is None
    assert verdict(one, None) == "not distinguishable at 1 seed"
    assert paired_difference({1: 4.0}, {0: 5.0}) is None
    same = paired_difference({0: 5.1, 1: 5.2}, {0: 5.0, 1: 5.1})  # the same difference on every seed: no spread
    assert same.std == pytest.approx(0.0, abs=1e-12) and same.p_value < 1e-9 and verdict(same, same.p_value) == "worse"
    assert paired_difference({0: 5.0, 1: 5.0}, {0: 5.0, 1: 5.0}).p_value == 1.0


def test_best_lr_skips_diverged_lrs_and_finds_the_edge():
    losses = {1e-3: 5.0, 3e-3: 4.5, 1e-2: None}
    assert best_lr(losses) == 3e-3
    # 1e-2 diverged but is still on the grid, so 3e-3 is inside it:
    assert grid_edge([1e-3, 3e-3, 1e-2], 3e-3) is None
    assert grid_edge([1e-3, 3e-3, 1e-2], 1e-3) == "low"
    assert grid_edge([1e-3, 3e-3, 1e-2], 1e-2) == "high"
    assert grid_edge([3e-3], 3e-3) == "single"
    assert best_lr({1e-3: None}) is None and grid_edge([1e-3], None) is None


def test_next_lr_continues_the_grid_by_its_own_step():
    assert next_lr([1e-3, 3e-3, 9e-3], "high") == [pytest.approx(2.7e-2)]
    assert next_lr([1e-3, 3e-3, 9e-3], "low") == [pytest.approx(3.333e-4)]
    assert next_lr([3e-3], "single") == [1e-3, 9e-3]
    assert next_lr([1e-3, 3e-3], None) == []


def test_lr_sensitivity_caps_at_the_initial_loss():
    # best 4.0; 5.0 counts as 5.0; 9.0 is capped at the initial loss 8.0; a diverged LR counts as 8.0.
    assert lr_sensitivity({1: 4.0, 2: 5.0, 3: 9.0, 4: None}, 8.0) == pytest.approx((0 + 1 + 4 + 4) / 4)
    assert lr_sensitivity({1: 4.0, 2: 4.0}, 8.0) == 0.0
    assert lr_sensitivity({1: 4.0}, None) is None
