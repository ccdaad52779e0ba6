"""The training losses: the next-token cross-entropy and the losses that replace it (the `loss` group), the loss a
step trains on, and the softmax-collapse measure. Pure functions of tensors; the hooks that use them are in
llmstable.stabilizers.losses, and what each loss's logits mean is declared by its schema (llmstable.config.loss).

- StableMax (Prieto et al. 2025, "Grokking at the Edge of Numerical Stability", arXiv 2501.04697): the logits
  are scores x with p_i = s(x_i) / sum_j s(x_j), s(x) = x + 1 for x >= 0 and 1 / (1 - x + eps) for x < 0. As in the
  official code, the scores are taken to float64 before s, with eps = 1e-30 in the x < 0 branch only.
- Spherical Z-loss (de Brebisson and Vincent 2016, arXiv 1604.08859): each position's logits are standardised,
  z = (o - mean(o)) / (std(o) + 1e-12) (the population std, over the vocabulary), and
  loss = softplus(a (b - z_target)) / a, as in the authors' code.
  It defines no distribution of its own; the logits are read as softmax logits for sampling and for the
  cross-entropy that evaluation reports beside it.
- The softmax-collapse monitor (Prieto et al. 2025, section 3): the share of positions whose fp32 softmax
  probability of the target is exactly 1.0. There the target's component of the cross-entropy's gradient,
  p_target - 1, is exactly zero; the other components, p_j, are tiny but not zero (about 2e-9 each on the logits
  [20, 0 x 9]), so the position still pushes the other logits down, and the target's logit no longer moves.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def training_loss(stabilizers, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss a step trains on: the cross-entropy, unless a stabilizer provides one that replaces it (the first
    whose `compute_loss` returns a tensor)."""
    for stabilizer in stabilizers:
        loss = stabilizer.compute_loss(logits, targets)
        if loss is not None:
            return loss
    return cross_entropy(logits, targets)


def stablemax_s(x: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """s(x): x + 1 for x >= 0, 1 / (1 - x + eps) for x < 0 (elementwise, any dtype). Each branch sees only its own
    half of the line (clamped), so the branch not taken never divides by zero, in values or in gradients."""
    negative = x < 0
    return torch.where(negative, 1.0 / (1.0 - x.clamp(max=0) + eps), x.clamp(min=0) + 1.0)


def log_stablemax(x: torch.Tensor, eps: float = 1e-30, dim: int = -1) -> torch.Tensor:
    """log(s(x) / sum s(x)) over `dim`, in float64 (the official code's precision)."""
    s = stablemax_s(x.to(torch.float64), eps)
    return torch.log(s) - torch.log(s.sum(dim=dim, keepdim=True))


def stablemax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """Mean -log StableMax probability of the targets, computed in float64 and returned as fp32 (the loop's
    accumulator dtype; the cast is after the mean, so gradients are the float64 ones). logits (..., V)."""
    logp = log_stablemax(logits.reshape(-1, logits.shape[-1]), eps)
    return -logp.gather(-1, targets.reshape(-1, 1)).mean().float()


def stablemax_probs(logits: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """The StableMax distribution over the last dim, in float64 (for sampling)."""
    s = stablemax_s(logits.to(torch.float64), eps)
    return s / s.sum(dim=-1, keepdim=True)


def spherical_z_loss(logits: torch.Tensor, targets: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Mean over positions of softplus(a (b - z_target)) / a, z the position's logits standardised over the
    vocabulary, in fp32: z = (o - mean) / (std + 1e-12) with the population std, as in the authors' Theano code
    (pascal20100/factored_output_layer), so a position whose std is 0 has z = 0. They take the std as
    sqrt(mean(o^2) - mean^2), the spherical family's form; the centred variance here is the same in exact
    arithmetic without the cancellation. Where a position's logits are all equal (a zero-initialised head) the std
    is 0 and its square root's derivative infinite; there the std is taken as a constant 0, so the gradient is the
    large but finite (onehot - 1/V) / 1e-12 that gradient clipping can scale, not NaN."""
    o = logits.float().reshape(-1, logits.shape[-1])
    mean = o.mean(dim=-1, keepdim=True)
    var = o.var(dim=-1, correction=0, keepdim=True)
    std = torch.where(var > 0, var, 1.0).sqrt() * (var > 0)
    z_target = (o.gather(-1, targets.reshape(-1, 1)) - mean) / (std + 1e-12)
    return (F.softplus(a * (b - z_target)) / a).mean()


def softmax_collapse_fraction(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The share of positions whose fp32 softmax probability of the target is exactly 1.0, where the target's
    gradient component is exactly zero (a device tensor)."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    return (probs.gather(-1, targets.unsqueeze(-1)) == 1.0).float().mean()


def loss_function(cfg):
    """The training loss of a `loss` config: (logits, targets) -> scalar tensor (the function its schema names, with
    its arguments)."""
    module, name = cfg.target.split(":")
    fn = getattr(importlib.import_module(module), name)
    kwargs = cfg.kwargs()
    return (lambda logits, targets: fn(logits, targets, **kwargs)) if kwargs else fn
