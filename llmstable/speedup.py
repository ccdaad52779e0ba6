"""The speedup of an arm over the baseline as tokens saved, S = D_eff / D: D_eff is the budget at which the baseline
reaches the loss the arm reached at budget D. Pure functions of numbers; the study (llmstable.report.study) hands
them the baseline's final losses at each budget it ran and the arm's, seed by seed.

Inside the baseline's measured budgets, D_eff comes from its measured points: the mean final loss at each budget,
joined by a monotone cubic in log D (Fritsch and Carlson 1980, with Fritsch and Butland's slopes), read backwards.
It passes through every point, so the baseline's own speedup at each of its budgets is exactly 1, whatever curve
the points make. Beyond them nothing measured says what the baseline would reach, and the answer depends on the
law assumed, so two families are fitted to the points and both answers are given:
- a power law with a free floor, L = a D^(-B) + b (a, B > 0, b any real): with three budgets it passes through
  them when they flatten in log D, as such a law does; it refuses when they steepen (no such law follows them);
- a log-linear law, L = c - k ln D (k > 0), by least squares.
Each law is continued from the measured end point nearest the arm's loss, D_eff = D_end * D_law(L) / D_law(L_end):
the law gives the shape beyond the points, the points give where it starts, so the two methods meet at the end and
an arm that beat the baseline's best measured loss is never given a speedup below 1 by a line that misses that
point. A family also refuses when the arm's loss is beyond its reach (at or below the power law's floor).

The interval is the delta method over the paired seeds. Each seed is one replicate of the whole comparison: its
initial weights and data order are shared by the arm and by every baseline run of that seed. The seed's deviation
from the seeds' mean, in the arm's loss and in the baseline's loss at every budget together, is carried through
log D_eff by a central difference (z_s, the directional derivative along that deviation), and
log S +- t(0.975, n - 1) sd(z) / sqrt(n). So the spread of the arm's seeds, that of the baseline's seeds at every
budget, and their correlation within a seed all enter; which law holds beyond the measured budgets does not (the
two families show it), nor does the interpolation's own error between the points. One seed: no interval.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from llmstable.statistics import t_quantile

FAMILIES = ("power_law", "log_linear")
STEP = 0.05  # the central difference's step, as a share of each seed's deviation
MIN_R2 = 0.9  # a family explaining less of the points' variance refuses (its extrapolation would mean nothing)
INTERVAL_METHOD = ("95% delta-method t interval over the paired seeds (n - 1 degrees of freedom): each seed's "
                   "deviation in the arm's loss and in the baseline's loss at every budget carried through D_eff")


def pchip_slopes(xs: list[float], ys: list[float]) -> list[float]:
    """The derivative at each knot of the monotone cubic (Fritsch-Carlson): interior knots take the weighted harmonic
    mean of the neighbouring secants (0 where they differ in sign), the ends a three-point estimate kept from
    overshooting."""
    h = [b - a for a, b in zip(xs, xs[1:])]
    d = [(y1 - y0) / hk for y0, y1, hk in zip(ys, ys[1:], h)]
    if len(d) == 1:
        return [d[0], d[0]]
    m = [0.0] * len(xs)
    for k in range(1, len(xs) - 1):
        if d[k - 1] * d[k] > 0:
            w1, w2 = 2 * h[k] + h[k - 1], h[k] + 2 * h[k - 1]
            m[k] = (w1 + w2) / (w1 / d[k - 1] + w2 / d[k])
    for end, (h0, h1, d0, d1) in ((0, (h[0], h[1], d[0], d[1])), (-1, (h[-1], h[-2], d[-1], d[-2]))):
        slope = ((2 * h0 + h1) * d0 - h0 * d1) / (h0 + h1)
        if slope * d0 <= 0:
            slope = 0.0
        elif d0 * d1 < 0 and abs(slope) > 3 * abs(d0):
            slope = 3 * d0
        m[end] = slope
    return m


def hermite(x: float, x0: float, x1: float, y0: float, y1: float, m0: float, m1: float) -> float:
    h = x1 - x0
    s = (x - x0) / h
    return ((2 * s**3 - 3 * s**2 + 1) * y0 + (s**3 - 2 * s**2 + s) * h * m0 + (-2 * s**3 + 3 * s**2) * y1
            + (s**3 - s**2) * h * m1)


def interpolated_budget(budgets: list[float], losses: list[float], loss: float, extend: bool = False) -> float | None:
    """D_eff from the measured points (budgets ascending, losses strictly falling): the budget at which the monotone
    cubic through (ln D, L) reaches `loss`; a measured loss gives its own budget exactly. Outside the measured losses,
    None, or with `extend` the straight line of the end's slope (for the interval's small steps past an end)."""
    if loss in losses:
        return budgets[losses.index(loss)]
    xs = [math.log(d) for d in budgets]
    m = pchip_slopes(xs, losses)
    if loss > losses[0] or loss < losses[-1]:
        if not extend:
            return None
        k = 0 if loss > losses[0] else -1
        return math.exp(xs[k] + (loss - losses[k]) / m[k]) if m[k] < 0 else None
    k = next(i for i in range(len(losses) - 1) if losses[i] >= loss >= losses[i + 1])
    low, high = xs[k], xs[k + 1]
    for _ in range(100):  # the cubic falls monotonically on the segment: bisection
        mid = (low + high) / 2
        if hermite(mid, xs[k], xs[k + 1], losses[k], losses[k + 1], m[k], m[k + 1]) > loss:
            low = mid
        else:
            high = mid
    return math.exp((low + high) / 2)


@dataclass(frozen=True)
class PowerLaw:
    """L(D) = a D^(-B) + b, the floor b free."""

    a: float
    B: float
    b: float
    r2: float

    def budget_for(self, loss: float) -> float | None:
        return (self.a / (loss - self.b)) ** (1.0 / self.B) if loss > self.b else None


@dataclass(frozen=True)
class LogLinear:
    """L(D) = c - k ln D."""

    c: float
    k: float
    r2: float

    def budget_for(self, loss: float) -> float | None:
        return math.exp((self.c - loss) / self.k)


def _r2(ys: list[float], sse: float) -> float:
    ym = statistics.fmean(ys)
    sst = sum((y - ym) ** 2 for y in ys)
    return 1.0 - sse / sst if sst > 0 else 0.0


def fit_power_law(budgets: list[float], losses: list[float]) -> tuple[PowerLaw | None, str]:
    """Least squares with a > 0 and B in (0, 4]: for each B the best (a, b) is linear, so the search is over B alone
    (a log grid, then golden-section). The fit refuses, with the reason, at fewer than 3 budgets, when the losses do
    not fall, or when the best B is the grid's smallest: the points steepen in log D, as no such law does."""
    if len(budgets) < 3:
        return None, f"{len(budgets)} budgets: a power law with a floor needs >= 3"
    scale = budgets[-1]  # in units of the largest budget, so D^(-B) stays near 1
    xs = [d / scale for d in budgets]

    def solve(B: float) -> tuple[float, float, float]:
        zs = [x ** (-B) for x in xs]
        zm, ym = statistics.fmean(zs), statistics.fmean(losses)
        a = sum((z - zm) * (y - ym) for z, y in zip(zs, losses)) / sum((z - zm) ** 2 for z in zs)
        b = ym - a * zm
        return sum((a * z + b - y) ** 2 for z, y in zip(zs, losses)), a, b

    grid = [0.01 * 1.1**k for k in range(64) if 0.01 * 1.1**k <= 4.0]
    best = min(grid, key=lambda B: solve(B)[0])
    if best == grid[0]:
        slopes = [(y1 - y0) / math.log(d1 / d0) for d0, d1, y0, y1 in zip(budgets, budgets[1:], losses, losses[1:])]
        return None, ("the baseline's points steepen in log D (slopes per e-fold " +
                      ", ".join(f"{s:.3g}" for s in slopes) + "): no power law a*D^-B + b with a, B > 0 follows them")
    lo, hi = best / 1.1, min(best * 1.1, 4.0)
    for _ in range(100):  # golden-section on the sum of squares
        m1, m2 = hi - 0.618034 * (hi - lo), lo + 0.618034 * (hi - lo)
        lo, hi = (lo, m2) if solve(m1)[0] <= solve(m2)[0] else (m1, hi)
    B = (lo + hi) / 2
    sse, a, b = solve(B)
    if a <= 0:
        return None, "the baseline's loss does not fall with the budget"
    law = PowerLaw(a=a * scale**B, B=B, b=b, r2=_r2(losses, sse))
    return (law, "") if law.r2 >= MIN_R2 else (None, f"poor fit (R^2 = {law.r2:.3f} < {MIN_R2})")


def fit_log_linear(budgets: list[float], losses: list[float]) -> tuple[LogLinear | None, str]:
    """Least squares of L on ln D; refuses at fewer than 2 budgets or when the loss does not fall."""
    if len(budgets) < 2:
        return None, f"{len(budgets)} budget: a line needs >= 2"
    xs = [math.log(d) for d in budgets]
    xm, ym = statistics.fmean(xs), statistics.fmean(losses)
    slope = sum((x - xm) * (y - ym) for x, y in zip(xs, losses)) / sum((x - xm) ** 2 for x in xs)
    if slope >= 0:
        return None, "the baseline's loss does not fall with the budget"
    c = ym - slope * xm
    law = LogLinear(c=c, k=-slope, r2=_r2(losses, sum((c + slope * x - y) ** 2 for x, y in zip(xs, losses))))
    return (law, "") if law.r2 >= MIN_R2 else (None, f"poor fit (R^2 = {law.r2:.3f} < {MIN_R2})")


FITS = {"power_law": fit_power_law, "log_linear": fit_log_linear}


def d_eff(method: str, budgets: list[float], losses: list[float], loss: float) -> tuple[float | None, str]:
    """D_eff by `method` (interpolated, or one of FAMILIES fitted to the points), with the reason when there is none.
    A family's law is continued from the measured end nearest the loss (the largest budget for a lower loss):
    D_eff = D_end * D_law(loss) / D_law(L_end), so it meets the interpolation there, even where a least-squares law
    misses that point, and a loss below every measured one never gets a speedup under 1."""
    if method == "interpolated":
        return interpolated_budget(budgets, losses, loss, extend=True), "outside the measured losses"
    law, reason = FITS[method](budgets, losses)
    if law is None:
        return None, reason
    end = -1 if loss < losses[-1] else 0
    value, at_end = law.budget_for(loss), law.budget_for(losses[end])
    if value is None or at_end is None:
        below = loss if value is None else losses[end]
        return None, f"loss {below:.4g} is at or below the power law's floor b = {law.b:.4g}: no budget reaches it"
    return budgets[end] * value / at_end, ""


@dataclass(frozen=True)
class Estimate:
    """One speedup: its value and 95% interval (None, with the reason, when there is none)."""

    value: float | None
    interval: tuple[float, float] | None
    reason: str = ""


def estimate(method: str, budgets: list[float], curve: dict[int, list[float]], arm: dict[int, float],
             budget: float) -> Estimate:
    """S = D_eff / budget at the seeds' mean losses, and its delta-method interval over the paired seeds (`curve`:
    seed -> the baseline's loss at each budget; `arm`: seed -> the arm's loss; the same seeds in both)."""
    seeds = sorted(arm)
    means = [statistics.fmean(curve[s][i] for s in seeds) for i in range(len(budgets))]
    center = statistics.fmean(arm[s] for s in seeds)
    value, reason = d_eff(method, budgets, means, center)
    if value is None:
        return Estimate(None, None, reason)
    speed = value / budget
    if len(seeds) < 2:
        return Estimate(speed, None, "one seed: no interval")
    z = []
    for s in seeds:
        ends = []
        for h in (STEP, -STEP):
            shifted = [m + h * (curve[s][i] - m) for i, m in enumerate(means)]
            d, why = d_eff(method, budgets, shifted, center + h * (arm[s] - center))
            if d is None:
                return Estimate(speed, None, f"no interval: seed {s}'s deviation leaves the method's reach ({why})")
            ends.append(math.log(d))
        z.append((ends[0] - ends[1]) / (2 * STEP))
    half = t_quantile(0.975, len(seeds) - 1) * statistics.stdev(z) / math.sqrt(len(seeds))
    return Estimate(speed, (speed * math.exp(-half), speed * math.exp(half)))


def speedup(budgets: list[float], curve: dict[int, list[float]], arm: dict[int, float], budget: float) -> dict:
    """The arm's speedup: {"method", "value", "interval", "reason", "families"}. interpolated when the arm's mean
    loss lies within the baseline's measured ones (value from the monotone cubic); extrapolated otherwise (value None:
    each family's value and interval in "families"); unavailable with the reason when neither applies."""
    seeds = sorted(set(arm) & set(curve))
    if not seeds:
        return {"method": "unavailable", "value": None, "interval": None, "families": {}, "seeds": [],
                "reason": "no seed has both the arm's loss and the baseline's at every budget"}
    curve, arm = {s: curve[s] for s in seeds}, {s: arm[s] for s in seeds}
    means = [statistics.fmean(curve[s][i] for s in seeds) for i in range(len(budgets))]
    if len(budgets) < 2 or any(b >= a for a, b in zip(means, means[1:])):
        return {"method": "unavailable", "value": None, "interval": None, "families": {}, "seeds": seeds,
                "reason": "the baseline's mean loss does not fall at every step of its budgets " +
                          ", ".join(f"{d:,.0f}: {v:.4g}" for d, v in zip(budgets, means))}
    mean = statistics.fmean(arm.values())
    if means[-1] <= mean <= means[0]:
        est = estimate("interpolated", budgets, curve, arm, budget)
        return {"method": "interpolated", "value": est.value, "interval": est.interval, "reason": est.reason,
                "families": {}, "seeds": seeds}
    families = {}
    for family in FAMILIES:
        est = estimate(family, budgets, curve, arm, budget)
        families[family] = {"value": est.value, "interval": est.interval, "reason": est.reason}
    side = "below" if mean < means[-1] else "above"
    return {"method": "extrapolated", "value": None, "interval": None, "families": families, "seeds": seeds,
            "reason": f"the arm's mean loss {mean:.4g} is {side} every loss the baseline measured "
                      f"({means[-1]:.4g} to {means[0]:.4g})"}


def fits(budgets: list[float], means: list[float]) -> dict:
    """Both families fitted to the baseline's mean losses, for the report: parameters and R^2, or the reason."""
    out = {}
    for family, fit in FITS.items():
        law, reason = fit(budgets, means)
        out[family] = {"reason": reason, **(asdict(law) if law is not None else {})}
    return out
