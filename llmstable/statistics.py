"""The statistics of a study, as pure functions of numbers (no files): Student's t interval of a paired difference,
the best LR of a grid and whether it sits on an edge, Wortsman et al.'s LR sensitivity, and the fit of the
baseline's final loss against its budget, L(D) = a * D^(-B) + b, with the budget an arm's loss is worth (D_eff).

Each function is tested on constructed numbers with known answers (tests/test_statistics.py).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Student's t: the 0.975 quantile for 1 to 30 degrees of freedom (two-sided 95%); beyond 30 the Cornish-Fisher
# expansion below is within 1e-4 of the exact value.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with df degrees of freedom."""
    if df < 1:
        raise ValueError(f"Student's t needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class PairedDifference:
    """mean(arm - baseline) over the seeds both have, its standard deviation and the 95% t interval (None with a
    single pair), and the verdict the interval supports (lower loss is better)."""

    n: int
    mean: float
    std: float | None
    ci95: tuple[float, float] | None

    @property
    def verdict(self) -> str:
        if self.ci95 is None:
            return f"not distinguishable at {self.n} seed{'s' if self.n != 1 else ''}"
        low, high = self.ci95
        if high < 0:
            return "better"
        if low > 0:
            return "worse"
        return f"not distinguishable at {self.n} seeds"


def paired_difference(arm: dict[int, float], baseline: dict[int, float]) -> PairedDifference | None:
    """Per-seed losses of an arm and of the baseline (seed -> loss); the arms share initial weights and data order
    per seed, so the differences are paired. None when no seed has both."""
    seeds = sorted(set(arm) & set(baseline))
    if not seeds:
        return None
    diffs = [arm[s] - baseline[s] for s in seeds]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(1, mean, None, None)
    std = statistics.stdev(diffs)
    half = t975(len(diffs) - 1) * std / math.sqrt(len(diffs))
    return PairedDifference(len(diffs), mean, std, (mean - half, mean + half))


def best_lr(mean_loss_by_lr: dict[float, float | None]) -> float | None:
    """The LR of the lowest mean final loss; an LR with a diverged seed has None and never wins."""
    finite = {lr: v for lr, v in mean_loss_by_lr.items() if v is not None and math.isfinite(v)}
    return min(finite, key=lambda lr: (finite[lr], lr)) if finite else None


def grid_edge(grid: list[float], best: float | None) -> str | None:
    """'low' or 'high' when the best LR is the smallest or largest of the grid, 'single' for a grid of one LR
    (nothing was tuned), None when it is inside (or nothing trained)."""
    grid = sorted(set(grid))
    if best is None:
        return None
    if len(grid) == 1:
        return "single"
    if best == grid[0]:
        return "low"
    if best == grid[-1]:
        return "high"
    return None


def next_lr(grid: list[float], edge: str) -> list[float]:
    """The LRs that extend a grid past its edge by the grid's own step at that edge (x3 for a grid of one LR)."""
    grid = sorted(set(grid))
    if edge == "single":
        return [_round(grid[0] / 3), _round(grid[0] * 3)]
    if edge == "low":
        return [_round(grid[0] * grid[0] / grid[1])]
    if edge == "high":
        return [_round(grid[-1] * grid[-1] / grid[-2])]
    return []


def _round(lr: float) -> float:
    """Four significant digits, so that run directories get readable names."""
    return float(f"{lr:.4g}")


def lr_sensitivity(mean_loss_by_lr: dict[float, float | None], initial_loss: float | None) -> float | None:
    """Wortsman et al. 2023 (arXiv 2309.14322, section 3.1): the mean over the grid of min(loss(lr), initial loss)
    minus the best loss; a diverged LR (None) counts at the initial loss. 0 means every LR is as good as the best."""
    if initial_loss is None or not mean_loss_by_lr:
        return None
    capped = [min(v, initial_loss) if v is not None and math.isfinite(v) else initial_loss
              for v in mean_loss_by_lr.values()]
    return statistics.fmean(capped) - min(capped)


@dataclass(frozen=True)
class PowerLawFit:
    """L(D) = a * D^(-B) + b fitted by least squares to (budget, final loss) points; r2 is the share of the losses'
    variance it explains, and d_min / d_max the budgets it was fitted on."""

    a: float
    B: float
    b: float
    r2: float
    d_min: float
    d_max: float

    def loss(self, budget: float) -> float:
        return self.a * budget ** (-self.B) + self.b

    def budget_for(self, loss: float) -> float | None:
        """The budget at which the fit reaches `loss`; None at or below the asymptote b (no budget reaches it)."""
        if loss <= self.b:
            return None
        return (self.a / (loss - self.b)) ** (1.0 / self.B)


MIN_R2 = 0.9  # a fit explaining less of its points' variance is called poor, and gives no speedup


def fit_power_law(budgets: list[float], losses: list[float]) -> tuple[PowerLawFit | None, str]:
    """Fit L(D) = a * D^(-B) + b with a > 0, b >= 0 (a cross-entropy has no negative floor) and B in (0, 4]: for
    each B the best (a, b) is linear least squares, so the search is one-dimensional (a log grid, then
    golden-section refinement). Returns (fit, reason); the fit is
    None, with the reason, when there are fewer than 3 budgets or the losses do not fall with the budget."""
    points = sorted((d, v) for d, v in zip(budgets, losses) if v is not None and math.isfinite(v))
    if len({d for d, _ in points}) < 3:
        return None, f"the baseline has final losses at {len({d for d, _ in points})} budgets; the fit needs >= 3"
    scale = points[-1][0]  # fit in units of the largest budget, so D^(-B) stays near 1
    xs = [d / scale for d, _ in points]
    ys = [v for _, v in points]

    def solve(B: float) -> tuple[float, float, float]:
        zs = [x ** (-B) for x in xs]
        zm, ym = statistics.fmean(zs), statistics.fmean(ys)
        szz = sum((z - zm) ** 2 for z in zs)
        a = sum((z - zm) * (y - ym) for z, y in zip(zs, ys)) / szz
        b = ym - a * zm
        if b < 0:  # a loss has no negative floor: the best fit with b >= 0 then has b = 0 (least squares through 0)
            a, b = sum(z * y for z, y in zip(zs, ys)) / sum(z * z for z in zs), 0.0
        return sum((a * z + b - y) ** 2 for z, y in zip(zs, ys)), a, b

    grid = [0.01 * 1.1**k for k in range(0, 64) if 0.01 * 1.1**k <= 4.0]
    best = min(grid, key=lambda B: solve(B)[0])
    lo, hi = best / 1.1, min(best * 1.1, 4.0)
    for _ in range(60):  # golden-section search on the sum of squares
        m1, m2 = hi - 0.618 * (hi - lo), lo + 0.618 * (hi - lo)
        lo, hi = (lo, m2) if solve(m1)[0] <= solve(m2)[0] else (m1, hi)
    B = (lo + hi) / 2
    sse, a, b = solve(B)
    if a <= 0:
        return None, "the baseline's final loss does not fall with the budget (fitted a <= 0)"
    ym = statistics.fmean(ys)
    sst = sum((y - ym) ** 2 for y in ys)
    r2 = 1.0 - sse / sst if sst > 0 else 0.0
    fit = PowerLawFit(a=a * scale**B, B=B, b=b, r2=r2, d_min=points[0][0], d_max=points[-1][0])
    if r2 < MIN_R2:
        return None, f"poor fit of L(D) = a*D^-B + b (R^2 = {r2:.3f} < {MIN_R2})"
    return fit, ""


@dataclass(frozen=True)
class Speedup:
    """D_eff / D for one loss: status 'fit' (D_eff inside the fitted budgets), 'extrapolated' (outside them) or
    'unavailable' (value None), with the reason for anything but 'fit'."""

    value: float | None
    status: str
    reason: str = ""


def speedup(fit: PowerLawFit | None, fit_reason: str, loss: float | None, budget: float) -> Speedup:
    """How many times its budget the baseline would need to reach `loss`: D_eff / budget, D_eff from the fit."""
    if fit is None:
        return Speedup(None, "unavailable", fit_reason)
    if loss is None or not math.isfinite(loss):
        return Speedup(None, "unavailable", "the arm has no finite final loss at its best LR")
    d_eff = fit.budget_for(loss)
    if d_eff is None:
        return Speedup(None, "unavailable", f"loss {loss:.4g} is at or below the fit's asymptote b = {fit.b:.4g}: "
                                            "no baseline budget reaches it")
    value = d_eff / budget
    # A small tolerance: the baseline's own loss at a fitted budget must count as inside.
    if d_eff < fit.d_min * (1 - 1e-6) or d_eff > fit.d_max * (1 + 1e-6):
        return Speedup(value, "extrapolated", f"D_eff = {d_eff:.4g} tokens lies outside the fitted budgets "
                                              f"[{fit.d_min:.4g}, {fit.d_max:.4g}]")
    return Speedup(value, "fit")
