"""SPAM: Spike-Aware Adam with Momentum Reset (Huang et al. 2025, arXiv 2501.06842).

Step for step the arithmetic of the official `galore_torch/SPAM.py` (TianjinYellow/SPAM-Optimizer), with t the
global step counted from 1 and k each parameter's own step count:

1. momentum reset: at every t with t mod DeltaT == 0, m and v are zeroed before use (k is not reset);
2. spike-aware clipping, when threshold != 0, t >= grad_accu_steps and (t mod DeltaT) >= grad_accu_steps:
   wherever g^2 > threshold * v (v before this step's update), g <- sign(g) * sqrt(threshold * v);
3. Adam: m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2,
   w <- w - lr * sqrt(1 - b2^k) / (1 - b1^k) * s * m / (sqrt(v) + eps)   (eps outside the bias correction);
4. decoupled weight decay after the update: w <- w - lr * wd * w;
5. post-reset damping s = 1 - 0.99 (1 + cos(pi c / (N + 1))) / 2 while c < N (N = warmup_steps), else 1. c counts
   steps since the last reset: it starts at N + 1, is set to 0 at the end of the step before a reset, and rises by
   1 after every step, so the reset step itself uses s = 0.01;
6. sparse momentum: a param group with `density` d keeps m and v only on a random mask of its entries, updates
   only those, and redraws the masks at the end of the step before each reset.

Fixed defects of the official code: weight decay had no effect on density groups (it decayed a copy made by
boolean indexing); here it decays the masked entries it updates. DeltaT = 0 divided by zero; here it means "never
reset". The global counters live in `state_dict()`, so a reloaded optimizer continues exactly.

The update of one tensor is `spam_update_`, a pure function of tensors; `compiled=True` runs it through
`torch.compile` (one fused loop per tensor instead of a dozen passes over memory).
"""

from __future__ import annotations

import math

import torch
from llmstable.optimizers.compile import compile_per_shape
from llmstable.optimizers.counting import ClipResetStats, CountingOptimizer
from llmstable.optimizers.sharding import local, shard_group


def spam_damping(c: int, warmup_steps: int) -> float:
    """The post-reset scale s for c steps since the last reset (official: 1 - CosineDecay(0.99, N).get_dr(c))."""
    if c >= warmup_steps:
        return 1.0
    return 1.0 - 0.99 * (1.0 + math.cos(math.pi * c / (warmup_steps + 1))) / 2.0


def spam_clip_active(t: int, threshold: float, grad_accu_steps: int, delta_t: int) -> bool:
    if threshold == 0 or t < grad_accu_steps:
        return False
    return delta_t == 0 or t % delta_t >= grad_accu_steps


def spam_update_(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step_size: torch.Tensor,
    decay: torch.Tensor, beta1: float, beta2: float, eps: float, threshold: float, clip: bool,
) -> torch.Tensor:
    """One SPAM update of a flat tensor, in place on p, m and v. step_size = lr * s * sqrt(1-b2^k)/(1-b1^k),
    decay = lr * wd. Returns the number of clipped entries (a device tensor)."""
    if clip:
        limit = threshold * v
        spiky = g * g > limit
        g = torch.where(spiky, torch.sign(g) * torch.sqrt(limit), g)
        clipped = spiky.sum()
    else:
        clipped = torch.zeros((), dtype=torch.int64, device=g.device)
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    p.sub_(step_size * (m / (v.sqrt() + eps)))
    p.sub_(decay * p)
    return clipped


class SPAM(CountingOptimizer):
    """SPAM with the official constructor names and defaults (drop-in for `galore_torch.SPAM.AdamW`).

    Hooks into training as a plain `torch.optim.Optimizer`; `metrics()` reports `stab/spam/clipped` (entries
    clipped since the last call) and `stab/spam/resets`; `pop_events()` yields one `momentum_reset` per reset.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True, no_deprecation_warning: bool = True,
                 warmup_steps: int = 150, threshold: float = 5000, DeltaT: int = 500, grad_accu_steps: int = 20,
                 compiled: bool = False):
        _check(lr >= 0, f"lr={lr} must be >= 0")
        _check(0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0, f"betas={betas} must lie in [0, 1)")
        _check(eps >= 0, f"eps={eps} must be >= 0")
        _check(weight_decay >= 0, f"weight_decay={weight_decay} must be >= 0")
        _check(DeltaT >= 0, f"DeltaT={DeltaT} must be >= 0 (0: never reset)")
        _check(warmup_steps >= 0 and threshold >= 0 and grad_accu_steps >= 0,
               "warmup_steps, threshold and grad_accu_steps must be >= 0")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if "density" in group:
                _check(0.0 < group["density"] <= 1.0, f"density={group['density']} must lie in (0, 1]")
        self.warmup_steps, self.threshold, self.DeltaT = warmup_steps, threshold, DeltaT
        self.grad_accu_steps, self.compiled = grad_accu_steps, compiled
        self.total_step = 0
        self.current_step = warmup_steps + 1
        self.stats = ClipResetStats("spam")
        self._init_masks()

    def _init_masks(self) -> None:
        """Exact-count random masks, drawn as the official code does (torch.randperm on the CPU generator)."""
        for group in self.param_groups:
            if "density" not in group:
                continue
            for p in group["params"]:
                count = int(group["density"] * p.numel())
                mask = torch.zeros(p.numel(), dtype=torch.bool)
                if count > 0:
                    mask[torch.randperm(p.numel())[:count]] = True
                self.state[p]["mask"] = mask.view(p.shape).to(p.device)

    def _redraw_masks(self) -> None:
        """New Bernoulli(density) masks (as the official update_mask_random); the moments on them start at zero,
        which is what the reset on the next step makes them anyway."""
        for group in self.param_groups:
            if "density" not in group:
                continue
            for p in group["params"]:
                state = self.state[p]
                state["mask"] = torch.rand(p.shape, device=p.device) < group["density"]
                if "exp_avg" in state:
                    n = int(state["mask"].sum())
                    state["exp_avg"] = torch.zeros(n, dtype=p.dtype, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(n, dtype=p.dtype, device=p.device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self.total_step + 1
        s = spam_damping(self.current_step, self.warmup_steps)
        reset = self.DeltaT > 0 and t % self.DeltaT == 0
        clip = spam_clip_active(t, self.threshold, self.grad_accu_steps, self.DeltaT)
        update = compile_per_shape(spam_update_) if self.compiled else spam_update_
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                masked = "density" in group
                sharded = shard_group(p) is not None
                if masked and sharded:
                    raise ValueError("SPAM's density (sparse momentum) needs whole tensors, not FSDP2 shards")
                g = p.grad[state["mask"]] if masked else local(p.grad.contiguous())  # elementwise: shards are fine
                self.stats.sharded |= sharded
                if "exp_avg" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(g if masked else p)  # dense: shaped (and sharded) like p
                    state["exp_avg_sq"] = torch.zeros_like(g if masked else p)
                if reset:
                    state["exp_avg"].zero_()
                    state["exp_avg_sq"].zero_()
                state["step"] += 1
                k = state["step"]
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size *= math.sqrt(1.0 - beta2**k) / (1.0 - beta1**k)
                scalars = torch.tensor([step_size * s, group["lr"] * group["weight_decay"]], dtype=p.dtype,
                                       device=p.device)
                target = p[state["mask"]] if masked else local(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                clipped = update(target, g, m if masked else local(m), v if masked else local(v), scalars[0], scalars[1],
                                 beta1, beta2, group["eps"], float(self.threshold), clip)
                if masked:
                    p[state["mask"]] = target  # boolean indexing copied; write the updated entries back
                self.stats.add_clipped(clipped)
        self.total_step += 1
        self.current_step += 1
        if reset:
            self.stats.reset_at(t)
        if self.DeltaT > 0 and (self.total_step + 1) % self.DeltaT == 0:
            self._redraw_masks()
            self.current_step = 0
        return loss

    # --- state ---------------------------------------------------------------------------------------------------

    def counters(self) -> dict:
        return {"total_step": self.total_step, "current_step": self.current_step}

    def set_counters(self, counters: dict) -> None:
        self.total_step, self.current_step = counters["total_step"], counters["current_step"]
        for state in self.state.values():  # torch casts floating state to the param dtype; masks stay boolean
            if "mask" in state:
                state["mask"] = state["mask"].bool()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
