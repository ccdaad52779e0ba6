"""The study's statistics on constructed numbers whose answers are known."""

import math

import pytest

from llmstable.statistics import (
    best_lr, fit_power_law, grid_edge, lr_sensitivity, next_lr, paired_difference, speedup, t975,
)


def test_t_quantiles_match_the_tables():
    assert t975(1) == pytest.approx(12.706, abs=1e-3)
    assert t975(4) == pytest.approx(2.776, abs=1e-3)
    assert t975(60) == pytest.approx(2.0003, abs=2e-4)
    assert t975(1000) == pytest.approx(1.9623, abs=2e-4)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 29, 31, 45, 200):
        assert t975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-4)


def test_paired_difference_uses_the_pairs_not_the_spread_of_each_arm():
    # The seeds move both arms by a lot; the arm is better by exactly 0.1, 0.12, 0.08 on each seed.
    baseline = {0: 5.0, 1: 6.0, 2: 4.0}
    arm = {0: 4.9, 1: 5.88, 2: 3.92}
    d = paired_difference(arm, baseline)
    assert d.n == 3 and d.mean == pytest.approx(-0.1)
    assert d.std == pytest.approx(0.02)
    half = 4.302653 * 0.02 / math.sqrt(3)
    assert d.ci95 == pytest.approx((-0.1 - half, -0.1 + half), abs=1e-4)
    assert d.verdict == "better"


def test_the_verdict_says_worse_or_not_distinguishable():
    assert paired_difference({0: 5.2, 1: 5.3}, {0: 5.0, 1: 5.1}).verdict == "worse"
    assert paired_difference({0: 4.9, 1: 5.3}, {0: 5.0, 1: 5.1}).verdict == "not distinguishable at 2 seeds"
    one = paired_difference({0: 4.0, 7: 1.0}, {0: 5.0})
    assert one.n == 1 and one.ci95 is None and one.verdict == "not distinguishable at 1 seed"
    assert paired_difference({1: 4.0}, {0: 5.0}) is None


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


def constructed(a=3.0e3, B=0.5, b=2.5, budgets=(250_000, 500_000, 1_000_000)):
    return list(budgets), [a * d ** -B + b for d in budgets]


def test_the_power_law_fit_recovers_constructed_losses():
    budgets, losses = constructed(budgets=(125_000, 250_000, 500_000, 1_000_000))
    fit, reason = fit_power_law(budgets, losses)
    assert reason == ""
    assert fit.B == pytest.approx(0.5, rel=1e-4) and fit.b == pytest.approx(2.5, abs=1e-4)
    assert fit.a == pytest.approx(3.0e3, rel=1e-3) and fit.r2 == pytest.approx(1.0)
    assert fit.budget_for(fit.loss(700_000)) == pytest.approx(700_000, rel=1e-6)


def test_the_floor_of_the_fit_is_never_negative():
    # Losses on a pure power law, as a short study sees them: the unconstrained floor would fall below zero.
    budgets = [75_000, 150_000, 300_000]
    fit, reason = fit_power_law(budgets, [40.0 * d**-0.16 for d in budgets])
    assert reason == "" and fit.b == pytest.approx(0.0, abs=1e-9)
    assert fit.B == pytest.approx(0.16, rel=1e-3) and fit.a == pytest.approx(40.0, rel=1e-3)


def test_d_eff_of_a_constructed_arm_is_the_budget_the_baseline_needs():
    budgets, losses = constructed()
    fit, reason = fit_power_law(budgets, losses)
    # An arm whose loss at 1M tokens equals the baseline's at 500k is a 0.5x speedup, inside the fit's range.
    half = speedup(fit, reason, 3.0e3 * 500_000 ** -0.5 + 2.5, 1_000_000)
    assert half.status == "fit" and half.value == pytest.approx(0.5, rel=1e-4)
    own = speedup(fit, reason, losses[-1], 1_000_000)
    assert own.status == "fit" and own.value == pytest.approx(1.0, rel=1e-5)
    # Matching the baseline at 2M tokens: 2x, outside the fitted budgets, so extrapolated, with the reason.
    double = speedup(fit, reason, 3.0e3 * 2_000_000 ** -0.5 + 2.5, 1_000_000)
    assert double.status == "extrapolated" and double.value == pytest.approx(2.0, rel=1e-4)
    assert "outside the fitted budgets" in double.reason
    below = speedup(fit, reason, 2.4, 1_000_000)
    assert below.status == "unavailable" and below.value is None and "asymptote" in below.reason


def test_no_speedup_from_too_few_budgets_or_losses_that_rise_with_the_budget():
    fit, reason = fit_power_law([1, 2], [5.0, 4.0])
    assert fit is None and "needs >= 3" in reason
    assert speedup(fit, reason, 4.0, 2).status == "unavailable"
    fit, reason = fit_power_law([1, 2, 4], [4.0, 4.5, 5.0])
    assert fit is None and "does not fall" in reason
    fit, reason = fit_power_law([1, 2, 4, 8], [5.0, 3.0, 4.5, 2.9])
    assert fit is None and "poor fit" in reason
