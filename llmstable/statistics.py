"""The statistics of a study, as pure functions of numbers (no files): Student's t distribution, the paired
difference of an arm against the baseline with its t interval and p-value, Holm's and Bonferroni's corrections over
the arms of a study, the best LR of a grid and whether it sits on an edge, and Wortsman et al.'s LR sensitivity.
The speedup (D_eff / D) is llmstable.speedup's.

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


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with an integer number of degrees of freedom, exactly: with theta = atan(t /
    sqrt(df)), P(|T| <= |t|) is a finite series in sin and cos of theta (Abramowitz and Stegun 26.7.3 and 26.7.4)."""
    if df < 1:
        raise ValueError(f"Student's t needs df >= 1, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + (2*4)/(3*5) cos^4 + ...)), df - 2 powers of cos
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        inside = 2 / math.pi * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))
    else:  # even: sin (1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ...), up to cos^(df-2)
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        inside = s * total
    return 0.5 + math.copysign(inside / 2, t)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t (bisection on t_cdf, to 1e-12 relative)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, high * 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
        if high - low <= 1e-12 * high:
            break
    return (low + high) / 2


@dataclass(frozen=True)
class PairedDifference:
    """mean(arm - baseline) over the seeds both have, its standard deviation, the 95% t interval and the two-sided
    p-value of "no difference" (None with a single pair); `interval(level)` at any level (a corrected one)."""

    n: int
    mean: float
    std: float | None
    ci95: tuple[float, float] | None
    p_value: float | None = None

    def interval(self, level: float) -> tuple[float, float] | None:
        if self.std is None:
            return None
        half = t_quantile(1 - (1 - level) / 2, self.n - 1) * self.std / math.sqrt(self.n)
        return self.mean - half, self.mean + half


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
    if std > 0:
        p = 2 * (1 - t_cdf(abs(mean) / (std / math.sqrt(len(diffs))), len(diffs) - 1))
    else:  # every seed moved by the same amount: no spread to test against
        p = 1.0 if mean == 0 else 0.0
    return PairedDifference(len(diffs), mean, std, (mean - half, mean + half), p)


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (Holm 1979): sorted ascending, the i-th of m is multiplied by m - i + 1,
    capped at 1 and made non-decreasing. Rejecting where the adjusted p < alpha keeps the chance of any false
    "better" or "worse" among the m arms under alpha."""
    order = sorted(p_values, key=p_values.get)
    out, running = {}, 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * p_values[key]))
        out[key] = running
    return out


def verdict(diff: PairedDifference | None, p_adjusted: float | None, alpha: float = 0.05) -> str:
    """better / worse when the adjusted p-value is under alpha (the sign of the mean difference says which; lower
    loss is better), else not distinguishable at this many seeds."""
    if diff is None:
        return "no seed in common"
    if p_adjusted is not None and p_adjusted < alpha:
        return "better" if diff.mean < 0 else "worse"
    return f"not distinguishable at {diff.n} seed{'s' if diff.n != 1 else ''}"


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
