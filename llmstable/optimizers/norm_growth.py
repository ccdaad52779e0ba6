"""Fira's norm-growth limiter (Chen et al. 2024, arXiv 2410.01623, section 4.3) as a pure function: Fira applies it
to each low-rank matrix's scaled residual (llmstable.optimizers.fira), and the `norm_growth_limiter` stabilizer to
every raw gradient (llmstable.stabilizers.norm_growth)."""

from __future__ import annotations

import torch


def limit_norm_growth(x: torch.Tensor, norm: torch.Tensor, prev_norm: torch.Tensor | None,
                      gamma: float = 1.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x scaled so that its norm grows by at most gamma over prev_norm: (x', norm to remember, limited?).

    Fira's arithmetic: r = norm / (prev_norm + 1e-8); limiter = max(r, gamma) / gamma; x' = x / limiter; the
    remembered norm is norm / limiter. Written with torch.where, so it never syncs the host; it takes the same
    branch as the official `max(r, gamma)` (which keeps r unless r < gamma) and divides by exactly 1.0 otherwise,
    so the result is bit-identical to it. With prev_norm None (the first step) x is returned as it is."""
    if prev_norm is None:
        return x, norm, torch.zeros((), dtype=torch.bool, device=x.device)
    ratio = norm / (prev_norm + 1e-8)
    below = ratio < gamma
    limiter = torch.where(below, torch.ones_like(ratio), ratio / gamma)
    return x / limiter, norm / limiter, ~below
