"""Stable-SPAM (Huang et al. 2025, arXiv 2502.17055): Adam with adaptive spike clipping (AdaClip), adaptive
gradient-norm scaling (AdaGN), a cosine-damped beta1 and periodic momentum resets.

Step for step the arithmetic of the official `galore_torch/stablespam.py` (TianjinYellow/StableSPAM), with t the
global step from 1 and k each parameter's own count (incremented before AdaClip):

1. cosine factor s = eta_min + (1 - eta_min)(1 + cos(pi t / (total_T + 1))) / 2 if total_T is set, else 1;
2. weight decay first: w <- w (1 - lr wd);
3. AdaClip: M = max|g| over the tensor; mu <- gamma3 mu + (1 - gamma3) M (unclipped M);
   tau = mu / (1 - gamma3^k); entries with |g| > tau are scaled by tau / M;
4. AdaGN: n = ||g|| of the clipped tensor, a = gamma1 s; p <- a p + (1 - a) n; q <- gamma2 q + (1 - gamma2) n^2;
   c = (p / (1 - a^k)) / (sqrt(q / (1 - gamma2^k)) + eps); if n > 0, g <- g c / n;
5. momentum reset when update_proj_gap != 0 and t mod update_proj_gap == 0: this step's update still uses the old
   m and v but is bias-corrected with k = 1; zeros are stored afterwards and the stored k becomes 1 (AdaClip and
   AdaGN above already used the incremented k; mu, p and q are never reset);
6. Adam with damped beta1' = beta1 s: m <- beta1' m + (1 - beta1') g, v <- beta2 v + (1 - beta2) g^2,
   w <- w - lr / (1 - beta1'^k) * m / (sqrt(v) / sqrt(1 - beta2^k) + eps)   (amsgrad: max of v instead of v).

The official code keeps its global step t out of `state_dict()`, so a reloaded optimizer restarts the cosine and
reset schedules; llmstable saves it. The per-tensor statistics (M, n) are reductions over the whole tensor.

The update of one tensor is `stable_spam_update_`, a pure function of tensors; `compiled=True` runs its two
passes over the entries through `torch.compile` (collectives, for sharded parameters, stay outside the kernels).
"""

from __future__ import annotations

import math

import torch
from llmstable.optimizers.compile import compile_kernel
from llmstable.optimizers.counting import ClipResetStats, CountingOptimizer
from llmstable.optimizers.sharding import all_reduce_, local, local_max, shard_group


def stable_spam_scale(t: int, total_T: int | None, eta_min: float) -> float:
    """The cosine factor s at global step t (official: CosineDecay(1.0, total_T, eta_min).get_dr(t))."""
    if total_T is None:
        return 1.0
    return eta_min + (1.0 - eta_min) * (1.0 + math.cos(math.pi * t / (total_T + 1))) / 2.0


def adaclip_threshold(g: torch.Tensor, stats: torch.Tensor, coef: torch.Tensor, gamma3: float):
    """First pass: M = max |g| and sum g^2, then AdaClip's mu = gamma3 mu + (1 - gamma3) M, tau = mu / (1 - gamma3^k)
    and the clip ratio tau / M. Returns (M, sum g^2, mu, tau, tau / M)."""
    peak, square_sum = g.abs().amax(), (g * g).sum()
    mu = gamma3 * stats[0] + (1 - gamma3) * peak
    tau = mu / coef[1]
    return peak, square_sum, mu, tau, tau / peak


def clipped_norm(g: torch.Tensor, tau: torch.Tensor, ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Second pass, AdaClip's result measured without writing it: (sum of squares of g with every entry above tau
    scaled by ratio = tau / M, number of such entries)."""
    spiky = g.abs() > tau
    clipped = g * torch.where(spiky, ratio, torch.ones_like(ratio))
    return (clipped * clipped).sum(), spiky.sum(dtype=torch.int32)


def adagn_factors(square_sum: torch.Tensor, mu: torch.Tensor, tau: torch.Tensor, ratio: torch.Tensor,
                  stats: torch.Tensor, coef: torch.Tensor, gamma2: float, eps: float) -> torch.Tensor:
    """Between the passes, scalars only: AdaGN's n = ||clipped g||, p and q (written into stats with mu), and the
    factors of the last pass [tau, tau / M, c / n, 1 - lr wd, beta1', 1 - beta1', 1 / sqrt(bc2), step size]."""
    decay, _, a, one_minus_a, norm_bc, q_bc, beta1, one_minus_beta1, inv_sqrt_bc2, step_size = coef.unbind()
    n = square_sum.sqrt()
    p_norm = a * stats[1] + one_minus_a * n
    q_norm = gamma2 * stats[2] + (1 - gamma2) * n * n
    c = (p_norm / norm_bc) / (torch.sqrt(q_norm / q_bc) + eps)
    stats.copy_(torch.stack([mu, p_norm, q_norm]))
    scale = torch.where(n > 0, c / n, torch.ones_like(n))
    return torch.stack([tau, ratio, scale, decay, beta1, one_minus_beta1, inv_sqrt_bc2, step_size])


def stable_spam_apply_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                       vmax: torch.Tensor | None, factors: torch.Tensor, beta2: float, eps: float,
                       clip: bool = True) -> None:
    """Last pass: AdaClip (with clip; without, no entry is above tau), AdaGN, the decoupled weight decay and Adam
    at once, in place on p, m, v, vmax, with the factors of `adagn_factors`."""
    tau, ratio, scale, decay, beta1, one_minus_beta1, inv_sqrt_bc2, step_size = factors.unbind()
    if clip:
        g = g * torch.where(g.abs() > tau, ratio, torch.ones_like(ratio))
    g = g * scale
    m.mul_(beta1).add_(one_minus_beta1 * g)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if vmax is not None:
        torch.maximum(vmax, v, out=vmax)
        v = vmax
    p.mul_(decay).sub_(step_size * (m / (v.sqrt() * inv_sqrt_bc2 + eps)))


def stable_spam_update_(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, vmax: torch.Tensor | None,
    stats: torch.Tensor, coef: torch.Tensor, gamma2: float, gamma3: float, beta2: float, eps: float,
    group=None, compiled: bool = False,
) -> torch.Tensor:
    """One Stable-SPAM update of a flat tensor, in place on p, m, v, vmax and stats = [mu, p_norm, q_norm].
    With `group` (a sharded parameter: p, g, m, v are this rank's rows), max |g| and ||g|| are all-reduced over
    the group, so the statistics are those of the whole tensor on every rank.

    coef holds the step's scalars, each computed in double on the host as the official code does: [1 - lr wd,
    1 - gamma3^k, a, 1 - a, 1 - a^k, 1 - gamma2^k, beta1', 1 - beta1', 1 / sqrt(1 - beta2^k'), lr / (1 - beta1'^k')],
    where k' is the bias-correction count of the Adam part. Returns the number of entries AdaClip scaled.

    Written for speed, with the official arithmetic up to float32 rounding (tested at 1e-6 over hundreds of
    steps): four kernels (`compiled=True`: inductor, through `compile_kernel`), none of which writes a temporary
    the size of the tensor. `adaclip_threshold` reads g once for max |g| and sum g^2; `clipped_norm` reads it again
    for the norm after AdaClip; `adagn_factors` turns the statistics into per-tensor factors, so that the last pass,
    `stable_spam_apply_`, multiplies each entry by a ready factor where the official code divides it (g / M * tau,
    g / n * c, sqrt(v) / sqrt(bc2)). On the CPU, where reading a scalar costs no device sync, a step whose max |g|
    is at most tau (no entry can be clipped: the common case) takes sum g^2 as the clipped norm and skips the
    second pass. Elsewhere, and for sharded tensors, every step takes all of them."""
    kernels = (adaclip_threshold, clipped_norm, adagn_factors, stable_spam_apply_)
    threshold, norm_pass, factors_of, apply_pass = map(compile_kernel, kernels) if compiled else kernels
    if group is None:
        peak, square_sum, mu, tau, ratio = threshold(g, stats, coef, gamma3)
    else:  # the whole tensor's max over the shards; the norm pass below reduces the sum of squares
        peak = all_reduce_(local_max(g.abs()), "max", group)
        mu = gamma3 * stats[0] + (1 - gamma3) * peak
        tau = mu / coef[1]
        ratio = tau / peak
    clip = group is not None or g.device.type != "cpu" or bool(peak > tau)
    if clip:
        square_sum, spiky = norm_pass(g, tau, ratio)
        if group is not None:
            square_sum = all_reduce_(square_sum, "sum", group)
    else:  # no entry is above tau: the clipped gradient is g itself
        spiky = torch.zeros((), dtype=torch.int32, device=g.device)
    apply_pass(p, g, m, v, vmax, factors_of(square_sum, mu, tau, ratio, stats, coef, gamma2, eps), beta2, eps, clip)
    return spiky


class StableSPAM(CountingOptimizer):
    """Stable-SPAM with the official constructor names and defaults (drop-in for `galore_torch.StableSPAM`).

    `metrics()` reports `stab/stable_spam/clipped` (entries AdaClip scaled since the last call) and
    `stab/stable_spam/resets`; `pop_events()` yields one `momentum_reset` per reset.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, gamma1: float = 0.7, gamma2: float = 0.9,
                 gamma3: float = 0.999, total_T: int | None = None, eta_min: float = 0.5,
                 update_proj_gap: int = 1000, compiled: bool = False):
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas={betas} must lie in [0, 1)")
        if gamma1 == -1:  # official convention: gamma1 = -1 means "use beta1"
            gamma1 = betas[0]
        for name, value in (("gamma1", gamma1), ("gamma2", gamma2), ("gamma3", gamma3)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value} must lie in [0, 1)")
        if total_T is not None and total_T <= 0:
            raise ValueError(f"total_T={total_T} must be a positive number of steps, or None")
        if update_proj_gap < 0:
            raise ValueError(f"update_proj_gap={update_proj_gap} must be >= 0 (0: never reset)")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad))
        self.gamma1, self.gamma2, self.gamma3 = gamma1, gamma2, gamma3
        self.total_T, self.eta_min, self.update_proj_gap = total_T, eta_min, update_proj_gap
        self.compiled = compiled
        self.total_steps = 0
        self.stats = ClipResetStats("stable_spam")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.total_steps += 1
        t = self.total_steps
        s = stable_spam_scale(t, self.total_T, self.eta_min)
        reset = self.update_proj_gap != 0 and t % self.update_proj_gap == 0
        a = self.gamma1 * s
        coefs: dict[tuple, torch.Tensor] = {}  # one small host-to-device copy per distinct (group, k), not per tensor
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            beta1 = beta1 * s
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:  # moments shaped (and sharded) like p; the statistics are whole-tensor
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["norm_stats"] = torch.zeros(3, dtype=p.dtype, device=p.device)  # mu, p, q
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                k = state["step"]
                k_adam = 1 if reset else k
                key = (id(group), k, p.dtype, p.device)
                if key not in coefs:
                    coefs[key] = torch.tensor([
                        1 - group["lr"] * group["weight_decay"], 1 - self.gamma3**k, a, 1 - a, 1 - a**k,
                        1 - self.gamma2**k, beta1, 1 - beta1, 1 / math.sqrt(1 - beta2**k_adam),
                        group["lr"] / (1 - beta1**k_adam),
                    ], dtype=p.dtype, device=p.device)
                coef = coefs[key]
                vmax = state.get("max_exp_avg_sq")
                shards = shard_group(p)
                clipped = stable_spam_update_(local(p), local(p.grad.contiguous()), local(state["exp_avg"]),
                                              local(state["exp_avg_sq"]), None if vmax is None else local(vmax),
                                              state["norm_stats"], coef, self.gamma2, self.gamma3, beta2,
                                              group["eps"], group=shards, compiled=self.compiled)
                self.stats.sharded |= shards is not None
                if reset:
                    state["exp_avg"].zero_()
                    state["exp_avg_sq"].zero_()
                    state["step"] = 1
                self.stats.add_clipped(clipped)
        if reset:
            self.stats.reset_at(t)
        return loss

    def counters(self) -> dict:
        return {"total_steps": self.total_steps}

    def set_counters(self, counters: dict) -> None:
        self.total_steps = counters["total_steps"]
