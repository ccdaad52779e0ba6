"""SignSoftSGD, S3 (Peng et al. 2025, arXiv 2507.06464): a sign-like update whose denominator is a p-th order
moment, with one beta for numerator and denominator, and a Nesterov-style numerator that needs no extra memory.

No official code is public, and the paper's text could not be read from here: this follows its abstract and a
third-party transcription of its algorithm box (the `zij` optimizer catalogue), per entry, with t counted from 1
and m_0 = s_0 = 0:

1. m_t = beta m_{t-1} + (1 - beta) g_t;
2. s_t = beta s_{t-1} + (1 - beta) |g_t|^p   (the same beta);
3. numerator n_t = beta m_t + (1 - beta) g_t (Nesterov's look-ahead folded into the current step, so no copy of
   the weights or of the last gradient is kept); denominator b_t = (beta s_t + (1 - beta) |g_t|^p)^(1/p);
4. w <- w (1 - lr wd), then w <- w - lr n_t / (b_t + eps).

Why the update is bounded: n_t and b_t^p are weighted sums of the same weights over g_1..g_t (beta (1 - beta)
beta^(t-i) for the past, beta (1 - beta) + (1 - beta) for g_t; they sum to 1 - beta^(t+1) <= 1), so by Hoelder's
inequality |n_t| <= b_t for every p >= 1 and |delta w| <= lr per entry, before weight decay. With nesterov=False
the numerator is m_t and the denominator s_t^(1/p), which have the same weights, so the bound holds as well.
With p = 2 and nesterov=False, S3 is Adam with beta1 = beta2 = beta and no bias correction (m / sqrt(v)).

Details the paper's box leaves open, and what is chosen here:
- the denominator of the Nesterov step is built from the same look-ahead as the numerator (b_t above, as the
  transcription has it), which is what keeps |n_t| <= b_t; the plain s_t^(1/p) would let a fresh spike through
  at up to (1 + beta) lr for p = 1;
- eps = 1e-8 is added to b_t after the root (Adam's placement), so an entry whose gradient was always 0 gets no
  update instead of 0 / 0;
- no bias correction: with a common beta both moments share the same start-up bias, and correcting only the
  numerator's linear bias would break the bound for the first steps;
- weight decay is decoupled (AdamW's form, before the update), not added to the gradient;
- the ratio n_t / (b_t + eps) is clamped to [-1, 1]. In exact arithmetic this changes nothing (the bound above);
  in fp32 or bf16, |g|^p underflows for large p (|g| = 1e-5 and p = 8 give 1e-40), which would otherwise let a
  small gradient through at many times lr. For p <= 4 and |g| >= eps it trims float rounding at most;
- defaults beta = 0.95 (the issue's) and p = 3 (the issue's, and the transcription's default); lr 1e-3 is ours.

The update of one tensor is `s3_update_`, a pure function of tensors; `compiled=True` runs it through
`torch.compile`. Every statistic is elementwise, so FSDP2 shards work as they are.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from llmstable.optimizers.compile import compile_per_shape
from llmstable.optimizers.sharding import local


def pth_root(x: torch.Tensor, power: float) -> torch.Tensor:
    """x^(1/power) for x >= 0, in place. exp2(log2(x) / p) rather than pow: within 1e-7 relative, and 2.5x faster
    compiled on CPU for p = 3 (pow's general path dominated the step); sqrt for p = 2."""
    if power == 1.0:
        return x
    if power == 2.0:
        return x.sqrt_()
    return x.log2_().mul_(1.0 / power).exp2_()


def s3_update_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, s: torch.Tensor, lr: torch.Tensor,
               decay: torch.Tensor, beta: float, power: float, eps: float, nesterov: bool) -> None:
    """One S3 step of a flat tensor, in place on p, m and s. lr and decay (= 1 - lr wd) are 0-dim tensors."""
    g_pow = g.abs().pow_(power)
    m.mul_(beta).add_(g, alpha=1.0 - beta)
    s.mul_(beta).add_(g_pow, alpha=1.0 - beta)
    if nesterov:
        numerator = (m * beta).add_(g, alpha=1.0 - beta)
        denominator = pth_root(g_pow.mul_(1.0 - beta).add_(s, alpha=beta), power)
    else:
        numerator, denominator = m, pth_root(s.clone(), power)
    # |ratio| <= 1 holds exactly; the clamp only catches |g|^p underflowing in fp32/bf16 (large p, small g)
    ratio = torch.div(numerator, denominator.add_(eps)).clamp_(-1.0, 1.0)
    p.mul_(decay)
    p.sub_(ratio.mul_(lr))


class S3(Optimizer):
    """SignSoftSGD. `beta` is the one decay of both moments, `p` the order of the denominator's moment."""

    def __init__(self, params, lr: float = 1e-3, beta: float = 0.95, p: float = 3.0, eps: float = 1e-8,
                 weight_decay: float = 0.0, nesterov: bool = True, compiled: bool = False):
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta={beta} must lie in [0, 1)")
        if not p >= 1.0:
            raise ValueError(f"p={p} must be >= 1 (the order of the denominator's moment; 3 in the paper)")
        super().__init__(params, dict(lr=lr, beta=beta, p=p, eps=eps, weight_decay=weight_decay, nesterov=nesterov))
        self.compiled = compiled

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        update = compile_per_shape(s3_update_) if self.compiled else s3_update_
        for group in self.param_groups:
            scalars = None
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:  # shaped (and sharded) like p
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_pow"] = torch.zeros_like(p)
                state["step"] += 1
                if scalars is None or scalars.device != p.device or scalars.dtype != p.dtype:
                    scalars = torch.tensor([group["lr"], 1.0 - group["lr"] * group["weight_decay"]],
                                           dtype=p.dtype, device=p.device)  # one small copy per group
                update(local(p), local(p.grad.contiguous()), local(state["exp_avg"]), local(state["exp_avg_pow"]),
                       scalars[0], scalars[1], group["beta"], float(group["p"]), group["eps"], group["nesterov"])
        return loss
