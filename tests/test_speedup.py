"""The speedup D_eff / D on constructed baselines whose law is known: the monotone interpolation through the measured
points, the two laws beyond them and their refusals, and the delta-method interval's coverage over simulated seeds."""

import math
import random

import pytest

from llmstable.speedup import (
    fit_log_linear, fit_power_law, interpolated_budget, pchip_slopes, speedup,
)

BUDGETS = [62_500.0, 125_000.0, 250_000.0]  # make compare's: 1/4, 1/2 and all of 250k tokens


def law(tokens):
    return 40.0 * tokens**-0.25 + 3.0  # a power law with a floor, losses 5.53, 5.13, 4.79 at the budgets


def test_the_monotone_cubic_matches_scipys_pchip_and_passes_through_the_points():
    xs = [math.log(d) for d in BUDGETS]
    ys = [law(d) for d in BUDGETS]
    interpolate = pytest.importorskip("scipy.interpolate")
    reference = interpolate.PchipInterpolator(xs, ys)
    assert pchip_slopes(xs, ys) == pytest.approx(list(reference.derivative()(xs)), rel=1e-12)
    for tokens in (70_000.0, 100_000.0, 180_000.0, 249_000.0):
        assert interpolated_budget(BUDGETS, ys, float(reference(math.log(tokens)))) == pytest.approx(tokens, rel=1e-9)
    assert [interpolated_budget(BUDGETS, ys, y) for y in ys] == BUDGETS  # exactly, not approximately
    assert interpolated_budget(BUDGETS, ys, law(300_000)) is None  # beyond the measured losses


def test_the_power_law_with_a_free_floor_recovers_its_constants_and_the_line_its_own():
    fit, reason = fit_power_law(BUDGETS, [law(d) for d in BUDGETS])
    assert reason == "" and fit.B == pytest.approx(0.25, rel=1e-5) and fit.b == pytest.approx(3.0, abs=1e-4)
    assert fit.budget_for(law(1e6)) == pytest.approx(1e6, rel=1e-5)
    line, reason = fit_log_linear(BUDGETS, [7.0 - 0.2 * math.log(d) for d in BUDGETS])
    assert reason == "" and line.k == pytest.approx(0.2) and line.budget_for(7.0 - 0.2 * math.log(1e6)) == \
        pytest.approx(1e6)


def test_each_law_refuses_with_its_reason():
    steepening = [5.5, 5.44, 5.36]  # the slopes per e-fold steepen: no power law with a floor bends that way
    fit, reason = fit_power_law(BUDGETS, steepening)
    assert fit is None and "steepen" in reason
    assert fit_power_law(BUDGETS[:2], steepening[:2])[1].startswith("2 budgets")
    assert "does not fall" in fit_log_linear(BUDGETS, [5.0, 5.1, 5.2])[1]
    below = speedup(BUDGETS, {0: [law(d) for d in BUDGETS], 1: [law(d) + 0.01 for d in BUDGETS]}, {0: 2.9, 1: 2.9},
                    BUDGETS[-1])
    assert below["families"]["power_law"]["value"] is None and "floor" in below["families"]["power_law"]["reason"]
    flat = speedup(BUDGETS, {0: [5.0, 5.1, 4.9]}, {0: 5.0}, BUDGETS[-1])
    assert flat["method"] == "unavailable" and "does not fall" in flat["reason"]


def test_the_baseline_is_exactly_1_at_each_of_its_budgets_with_a_zero_width_interval():
    rng = random.Random(0)
    curve = {s: [law(d) + rng.gauss(0, 0.02) for d in BUDGETS] for s in range(3)}
    for i, d in enumerate(BUDGETS):
        own = speedup(BUDGETS, curve, {s: v[i] for s, v in curve.items()}, d)
        assert own["method"] == "interpolated" and own["value"] == 1.0 and own["interval"] == (1.0, 1.0)


def simulate(truth: float, seeds: int, rng: random.Random) -> dict:
    """One study: each seed shifts the arm and every baseline run alike (shared init and data) by N(0, 0.02), and
    each run by its own N(0, 0.01); the arm's loss at the full budget is the baseline's at truth x the tokens."""
    curve, arm = {}, {}
    for s in range(seeds):
        shift = rng.gauss(0, 0.02)
        curve[s] = [law(d) + shift + rng.gauss(0, 0.01) for d in BUDGETS]
        arm[s] = law(truth * BUDGETS[-1]) + shift + rng.gauss(0, 0.01)
    return speedup(BUDGETS, curve, arm, BUDGETS[-1])


def coverage(truth, method, seeds=3, studies=150):
    rng, hits = random.Random(7), 0
    for _ in range(studies):
        result = simulate(truth, seeds, rng)
        estimate = result if method == "interpolated" else result["families"].get(method, {})
        interval = estimate.get("interval") if result["method"] == ("interpolated" if method == "interpolated"
                                                                   else "extrapolated") else None
        hits += bool(interval and interval[0] <= truth <= interval[1])
    return hits / studies


def test_the_95_percent_interval_covers_the_true_speedup_inside_and_beyond_the_budgets():
    """An arm at 0.7x (its loss is the baseline's at 70% of the tokens: inside the budgets, the monotone cubic's
    reading) and at 2x (beyond them, the true law's): about 95% of simulated studies cover the truth. The wrong law
    (log-linear, on points from a power law) almost never does beyond the budgets: why both are shown."""
    assert coverage(0.7, "interpolated") >= 0.9
    assert coverage(2.0, "power_law") >= 0.9
    assert coverage(2.0, "log_linear") < 0.2


def test_each_law_continues_from_the_measured_end_so_a_better_loss_is_never_a_slowdown():
    """The reported case: points a least-squares line misses (5.0, 4.8, 4.7); an arm at 4.69 beat the baseline's
    best measured loss, at the same tokens, so its speedup is just above 1 under either law, never below."""
    curve = {0: [5.0, 4.8, 4.7], 1: [5.02, 4.79, 4.71]}
    line = fit_log_linear(BUDGETS, [5.01, 4.795, 4.705])[0]
    assert line.budget_for(4.695) < BUDGETS[-1]  # the line alone would call a better loss a slowdown
    for arm_loss, low, high in ((4.695, 1.0, 1.3), (4.5, 1.5, None)):
        result = speedup(BUDGETS, curve, {0: arm_loss - 0.005, 1: arm_loss + 0.005}, BUDGETS[-1])
        assert result["method"] == "extrapolated"
        for family, estimate in result["families"].items():
            if estimate["value"] is not None:
                assert estimate["value"] > low and (high is None or estimate["value"] < high), (family, estimate)
    # a loss above every measured one continues from the smallest budget: the arm is slower than the baseline
    slow = speedup(BUDGETS, curve, {0: 5.05, 1: 5.06}, BUDGETS[-1])
    assert all(f["value"] is None or f["value"] < 0.25 for f in slow["families"].values())
