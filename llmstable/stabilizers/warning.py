"""Spike early warning from Adam's preconditioner (Bai et al. 2025, "Adaptive Preconditioners Trigger Loss Spikes
in Adam", arXiv 2506.04805).

Their mechanism: once g^2 << v for most coordinates, v only decays (at the rate beta2) and stops tracking the
gradient; the preconditioned Hessian H_hat = diag(1 / (sqrt(v_hat) + eps)) H then grows until its curvature along
the gradient exceeds the stability threshold 2/eta, and the loss spikes. Two signals:

- the proxy (`watch=[..., precond]`, at logged steps, cheap): per block, the share of coordinates whose
  g^2 < rho * v_hat, with v_hat = v / (1 - beta2^k) Adam's bias-corrected second moment before this step's update
  and rho = `precond_rho` (0.01: for a gradient that v tracks, g ~ N(0, v), that share is P(|z| < 0.1) = 8%; a
  share above `precond_frac` = 0.5 means v has lost track of most of the block). These two thresholds are ours:
  the paper states the regime (g^2 << v), not a number;
- the paper's predictor (`watch=[..., precond_curvature]`, every `curvature_interval` steps): the
  gradient-directional curvature of the preconditioned Hessian, lambda = g^T H_hat g / g^T g = (P g)^T (H g) / |g|^2,
  from one Hessian-vector product H g on the step's first micro-batch, against 2/eta (logged as the ratio
  lambda * eta / 2; above 1 predicts a spike). The paper ignores momentum in this threshold, and so do we. P is the
  preconditioner the optimizer applies at this step: v_hat from this step's v = beta2 v + (1 - beta2) g^2, with g
  the step's whole gradient after clipping (as torch's AdamW updates v; SPAM's clipping of spiky entries and
  Stable-SPAM's gradient normalisation are not replayed, so for them P is AdamW's reading of their v). So the
  product is taken in `on_loss` (d and H d, kept as d * H d per tensor) and P applied in `check`, once the step's
  gradients are final. Under DDP each rank holds its own first micro-batch: the ranks average their gradients (an
  all-reduce of one copy of the gradient) in `on_loss`, take the product along that mean and, in `check`, average
  g^T P H g (a second all-reduce of one number), so every rank gets the same lambda, that of all their first
  micro-batches together, and acts alike. These are the only collectives of the warning, on curvature steps, which
  every rank reaches alike (the step number and Adam's state decide them; if the double backward failed on one
  rank, the others would wait in the all-reduce until the job's timeout). FSDP2 and DeepSpeed are refused: their
  parameters are shards.

A crossing is a warning, not a spike: a `spike_warning` event, and, with `warn_lr_factor` < 1, the LR times that
factor for `warn_lr_steps` steps. Like the detector, the warning waits for `min_history` steps: early in a run v
still remembers the first, large gradients, and the proxy is high for every block. The double backward needs
attention's math kernel (the fused CPU and CUDA kernels have no second derivative), so the first forward of a
curvature step runs on it.
"""

from __future__ import annotations

import contextlib

import torch

from llmstable.parallel.world import rank_mean


def adam_v_hat(optimizer: torch.optim.Optimizer, p: torch.Tensor, current: bool = False) -> torch.Tensor | None:
    """Adam's bias-corrected second moment of parameter p before this step's update, or None (no state yet, or a
    state shaped unlike p, as SPAM's sparse masks are). current=True: the one this step's update applies,
    (beta2 v + (1 - beta2) g^2) / (1 - beta2^(k+1)) with g = p.grad as it is now (the last one, if p has none)."""
    state = optimizer.state.get(p, {})
    v = state.get("exp_avg_sq")
    if not isinstance(v, torch.Tensor) or v.shape != p.shape or "step" not in state:
        return None
    k = float(state["step"])
    beta2 = next(g["betas"][1] for g in optimizer.param_groups if any(q is p for q in g["params"]))
    if current and p.grad is not None:
        g = p.grad.float()
        return (beta2 * v.float() + (1.0 - beta2) * g * g) / (1.0 - beta2 ** (k + 1))
    return v / (1.0 - beta2 ** k) if k > 0 else None


def stale_counts(grad: torch.Tensor, v_hat: torch.Tensor, rho: float) -> torch.Tensor:
    """How many coordinates have g^2 < rho * v_hat (a device scalar)."""
    return (grad.float().square() < rho * v_hat.float()).sum()


def block_stale_fractions(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rho: float) -> torch.Tensor | None:
    """The stale share of each transformer block (device tensor (L,)), or None before Adam has any state."""
    out = []
    for layer in model.layers:
        stale, total = 0, 0
        for p in layer.parameters():
            v_hat = adam_v_hat(optimizer, p) if p.grad is not None else None
            if v_hat is not None:
                stale, total = stale + stale_counts(p.grad, v_hat, rho), total + p.numel()
        if not total:
            return None
        out.append(stale / total)
    return torch.stack(out).float()


def curvature_terms(loss: torch.Tensor, params: list[torch.Tensor],
                    mean=None) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """What g^T P H g / g^T g needs apart from P, for the loss's gradient g and Hessian H over `params` (one
    Hessian-vector product): per parameter g * (H g) in fp32 (None where the loss does not reach it), and g^T g.
    Keeps the loss's graph (a later backward still works).

    `mean`, for data-parallel ranks that each hold their own micro-batch: a function that returns a tensor averaged
    over the ranks (`llmstable.parallel.world.rank_mean`). g is then the ranks' mean gradient (one all-reduce of a
    flat copy) and the product is taken along it (H_r g on each rank); `precond_curvature` averages g^T P H_r g."""
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    used = [i for i, g in enumerate(grads) if g is not None]
    direction = [grads[i].detach().float() for i in used]
    if mean is not None:
        flat = mean(torch.cat([d.flatten() for d in direction]))
        direction = [f.view_as(d) for f, d in zip(flat.split([d.numel() for d in direction]), direction)]
    hvp = torch.autograd.grad([grads[i] for i in used], [params[i] for i in used],
                              grad_outputs=[d.to(grads[i].dtype) for d, i in zip(direction, used)],
                              retain_graph=True, allow_unused=True)
    terms: list[torch.Tensor | None] = [None] * len(params)
    for i, d, hd in zip(used, direction, hvp):
        if hd is not None:
            terms[i] = d * hd.float()
    return terms, torch.stack([d.square().sum() for d in direction]).sum()


def precond_curvature(terms: list[torch.Tensor | None], precond: list[torch.Tensor], den: torch.Tensor,
                      mean=None) -> torch.Tensor:
    """lambda = sum over parameters of P * g * (H g), over g^T g (`curvature_terms`); `mean` averages the sum over
    data-parallel ranks (each took the product on its own micro-batch)."""
    num = den.new_zeros(())
    for c, term in zip(precond, terms):
        if term is not None:
            num = num + (c.float() * term).sum()
    if mean is not None:
        num = mean(num)
    return num / den.clamp_min(1e-30)


def directional_curvature(loss: torch.Tensor, params: list[torch.Tensor], precond: list[torch.Tensor],
                          mean=None) -> torch.Tensor:
    """g^T diag(precond) H g / g^T g for the loss's gradient g and Hessian H over `params`, with P known now (as
    one process would on the ranks' micro-batches together, with `mean`)."""
    terms, den = curvature_terms(loss, params, mean)
    return precond_curvature(terms, precond, den, mean)


def group_eps(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> float:
    return next(g.get("eps", 1e-8) for g in optimizer.param_groups if any(q is p for q in g["params"]))


def adam_preconditioner(optimizer: torch.optim.Optimizer, current: bool = False) -> tuple[list, list] | None:
    """(params, 1 / (sqrt(v_hat) + eps)) for every parameter with Adam state, or None before the first step;
    current=True: with the v_hat this step's update applies (`adam_v_hat`)."""
    params, precond = [], []
    for group in optimizer.param_groups:
        for p in group["params"]:
            v_hat = adam_v_hat(optimizer, p, current)
            if v_hat is not None:
                params.append(p)
                precond.append(1.0 / (v_hat.sqrt() + group.get("eps", 1e-8)))
    return (params, precond) if params else None


class PrecondWarning:
    """The early warning, owned by the spike guard: `begin_step`, `on_loss` (the predictor), `on_gradients` (the
    proxy), then `check(step)` after the step's values are known, which returns the warning's fields or None."""

    def __init__(self, cfg, proxy: bool, curvature: bool):
        self.cfg, self.proxy, self.curvature = cfg, proxy, curvature
        self.optimizer: torch.optim.Optimizer | None = None
        self._logged, self._curvature_due = False, False
        self._math: contextlib.AbstractContextManager | None = None
        self._fractions: torch.Tensor | None = None  # (L,) this logged step's stale shares (device)
        self._terms: tuple | None = None  # this curvature step's (params, g * Hg per param, g^T g, rank mean)
        self._lr = 0.0
        self.lower_until = 0  # the LR is lowered through this step (checkpointed)
        self.warnings = 0  # (checkpointed; never goes back on a rollback)
        self._metrics: dict[str, float] = {}

    def begin_step(self, step: int, logged: bool) -> None:
        self._logged, self._fractions, self._terms = logged, None, None
        self._curvature_due = (self.curvature and self.optimizer is not None and step > 1
                               and step % self.cfg.curvature_interval == 0)
        if self._curvature_due:  # the math kernel has a second derivative; exited after the HVP
            from torch.nn.attention import SDPBackend, sdpa_kernel

            self._math = sdpa_kernel([SDPBackend.MATH])
            self._math.__enter__()

    def on_loss(self, loss: torch.Tensor) -> None:
        if not self._curvature_due:
            return
        self._curvature_due = False
        try:
            found = adam_preconditioner(self.optimizer)  # (the parameters with Adam state; P itself waits for check)
            if found is not None:
                ranks = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
                mean = rank_mean if ranks else None
                self._terms = (found[0], *curvature_terms(loss, found[0], mean), mean)
                self._lr = float(self.optimizer.param_groups[0]["lr"])
        finally:
            self._math.__exit__(None, None, None)
            self._math = None

    def on_gradients(self, model: torch.nn.Module) -> None:
        if self.proxy and self._logged and self.optimizer is not None and self._fractions is None:
            self._fractions = block_stale_fractions(model, self.optimizer, self.cfg.precond_rho)

    def check(self, step: int) -> dict | None:
        """After the step's gradients are final (averaged over ranks, clipped): the warning's fields if a signal
        crossed, else None. Host syncs only at logged steps (the proxy) and curvature steps (the predictor, whose P
        is built here from those gradients)."""
        fields = {}
        if self._fractions is not None:
            fractions = self._fractions.tolist()  # host sync, at logged steps only
            self._metrics.update({f"stab/precond/stale_frac/layer_{i}": f for i, f in enumerate(fractions)})
            self._metrics["stab/precond/stale_frac"] = max(fractions)
            if max(fractions) > self.cfg.precond_frac:
                fields.update(signal="precond", value=max(fractions), threshold=self.cfg.precond_frac,
                              layer=fractions.index(max(fractions)))
        if self._terms is not None:
            params, terms, den, mean = self._terms
            precond = [1.0 / (v.sqrt() + group_eps(self.optimizer, p))
                       for p, v in ((p, adam_v_hat(self.optimizer, p, current=True)) for p in params)]
            lam = float(precond_curvature(terms, precond, den, mean))  # host sync, every curvature_interval steps
            ratio = lam * self._lr / 2
            self._metrics.update({"stab/precond/curvature": lam, "stab/precond/curvature_ratio": ratio})
            if ratio > 1 and "signal" not in fields:
                fields.update(signal="precond_curvature", value=lam, threshold=2 / self._lr)
        self._fractions, self._terms = None, None
        if not fields or step <= self.cfg.min_history:  # (v still remembers the first, large gradients: no alarm)
            return None
        self.warnings += 1
        if self.cfg.warn_lr_factor < 1:
            self.lower_until = step + self.cfg.warn_lr_steps
            fields.update(lr_factor=self.cfg.warn_lr_factor, until_step=self.lower_until)
        return fields

    def lr_factor(self, step: int) -> float:
        return self.cfg.warn_lr_factor if step <= self.lower_until else 1.0

    def metrics(self) -> dict[str, float]:
        out, self._metrics = {**self._metrics, "stab/spike/warnings": self.warnings}, {}
        return out

    def state_dict(self) -> dict:
        return {"lower_until": self.lower_until, "warnings": self.warnings}

    def load_state_dict(self, state: dict) -> None:
        self.lower_until = state.get("lower_until", 0)
        self.warnings = max(self.warnings, state.get("warnings", 0))  # a counter: a rollback does not undo it
