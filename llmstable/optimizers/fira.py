"""Fira: low-rank Adam with a full-rank, norm-scaled residual (Chen et al. 2024, arXiv 2410.01623).

Step for step the arithmetic of the official `optimizer_torch/fira_adamw.py` and `gradient_projection.py`
(xichen-fy/Fira, also published as `fira` 1.0.2 on PyPI), for a parameter with gradient G and its own step count
k (0 before its first step):

1. projector (GaLore's), refreshed when k mod update_proj_gap == 0: the SVD of G, in fp32
   (`torch.linalg.svd(G.float(), full_matrices=False)`, deterministic, cast back to G's dtype), keeps
   P = U[:, :rank] (left) or Q = Vh[:rank] (right). `proj_type` picks the side: std projects the longer side
   away (right for tall or square G, left for wide), reverse_std the other one, left / right always that side.
   The projected gradient R is P^T G or G Q^T;
2. Adam on R: m <- b1 m + (1 - b1) R, v <- b2 v + (1 - b2) R^2, k <- k + 1, N = m / (sqrt(v) + eps),
   step = lr sqrt(1 - b2^k) / (1 - b1^k) (lr alone when correct_bias is false);
3. norm-based scaling: phi = ||N|| / (||R|| + 1e-8) along the low-rank dimension: per column of a wide R
   (rows < columns), per row otherwise; the residual S = (G - alpha B(R)) phi, where B is the back-projection
   (P R or R Q);
4. norm-growth limiter on S (gamma 1.01): if ||S|| / (||S_prev|| + 1e-8) > 1.01, S is divided by that ratio
   / 1.01; S_prev is the limited norm (`llmstable.optimizers.norm_growth.limit_norm_growth`);
5. w <- w - step (alpha B(N) + S), then decoupled weight decay after the update: w <- w - lr wd w.

Parameters of a group without `rank` get plain Adam (steps 2 and 5 on G). alpha multiplies the back-projection
wherever the official `project_back` does, so it also scales the part of G that is subtracted from the residual.

Deliberate differences, none of which changes a step the official code takes:
- the state holds tensors and plain values only: the projection matrix (`ortho_left` or `ortho_right`), the
  moments, the last residual norm and the step count, where the official code keeps a projector object; so
  `torch.load(weights_only=True)` reads a checkpoint, and a reloaded optimizer resumes bit-identically;
- the limiter runs on the device (torch.where) where the official `max(tensor, 1.01)` synced the host per tensor;
- the back-projection uses the side the projector was built on. The official code decides it again from the
  low-rank shape, which agrees for std but breaks reverse_std on a wide matrix when rank >= its rows (a shape
  error there, a correct step here);
- bad settings (a 1-D tensor in the low-rank group, an unknown proj_type, rank < 1) raise a ValueError naming
  the key, where the official code fails later or silently. proj_type=full (GaLore's two-sided projection) is
  refused: the official Fira fails on it with a shape error (its scaling factor does not fit the full matrix);
- a low-rank group may leave out update_proj_gap, alpha and proj_type (the official GradientProjector's
  defaults 200, 1.0 and std apply), where the official optimizer raises a KeyError;
- FSDP2 shards are refused (the SVD needs whole matrices).

`compiled=True` fuses the full-size elementwise work (plain Adam; the residual, its norm, the limiter and the
update) through `torch.compile` (`adam_step_`, `residual_step_`); the SVD, the projections and the small
low-rank Adam stay eager. Compiled steps equal the official ones to float rounding, not bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from llmstable.optimizers.compile import compile_per_shape
from llmstable.optimizers.sharding import shard_group
from llmstable.optimizers.norm_growth import limit_norm_growth

PROJ_TYPES = ("std", "reverse_std", "left", "right")
GROUP_DEFAULTS = {"update_proj_gap": 200, "alpha": 1.0, "proj_type": "std"}  # the official GradientProjector's


def projection_side(shape: torch.Size, proj_type: str) -> str:
    """"left" or "right": which orthogonal factor projects a gradient of this shape."""
    tall = shape[0] >= shape[1]
    if proj_type == "std":
        return "right" if tall else "left"
    if proj_type == "reverse_std":
        return "left" if tall else "right"
    return proj_type


def orthogonal_factor(g: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """U[:, :rank] (left) or Vh[:rank] (right) of the thin SVD of g, computed in fp32 and returned in g's dtype,
    as the official get_orthogonal_matrix. Cloned: a slice would keep (and checkpoint) the whole U or Vh; the
    values, and so every step, are the same."""
    u, _, vh = torch.linalg.svd(g if g.dtype == torch.float else g.float(), full_matrices=False)
    return (u[:, :rank] if side == "left" else vh[:rank, :]).to(g.dtype).clone()


def project(g: torch.Tensor, ortho: torch.Tensor, side: str) -> torch.Tensor:
    return torch.matmul(ortho.t(), g) if side == "left" else torch.matmul(g, ortho.t())


def project_back(r: torch.Tensor, ortho: torch.Tensor, side: str, alpha: float) -> torch.Tensor:
    return (torch.matmul(ortho, r) if side == "left" else torch.matmul(r, ortho)) * alpha


def scaling_factor(low: torch.Tensor, normalized: torch.Tensor) -> torch.Tensor:
    """Fira's norm-based scaling ||normalized|| / (||low|| + 1e-8), per column of a wide low-rank matrix and per
    row otherwise (the official norm_dim rule), shaped to broadcast over the full matrix."""
    dim = 0 if normalized.shape[0] < normalized.shape[1] else 1
    factor = torch.norm(normalized, dim=dim) / (torch.norm(low, dim=dim) + 1e-8)
    return factor.unsqueeze(1) if dim == 1 else factor


def adam_step_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, scalars: torch.Tensor,
               beta1: float, beta2: float, eps: float, decay: bool) -> None:
    """Steps 2 and 5 of a plain-Adam tensor in one pass (for torch.compile); scalars = [step, lr wd]."""
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    p.sub_(scalars[0] * (m / (v.sqrt() + eps)))
    if decay:
        p.sub_(scalars[1] * p)


def residual_step_(p: torch.Tensor, g: torch.Tensor, back_low: torch.Tensor, back_update: torch.Tensor,
                   factor: torch.Tensor, prev_norm: torch.Tensor | None, scalars: torch.Tensor,
                   decay: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 3 to 5 of a low-rank matrix in two passes (for torch.compile): the scaled residual, its norm, the
    limiter, the update and the decay. Returns (the norm to remember, limited?)."""
    residual = (g - back_low) * factor
    residual, norm, limited = limit_norm_growth(residual, torch.linalg.vector_norm(residual), prev_norm)
    p.sub_(scalars[0] * (back_update + residual))
    if decay:
        p.sub_(scalars[1] * p)
    return norm, limited


class Fira(Optimizer):
    """Fira with the official constructor and defaults (drop-in for `fira.FiraAdamW`): the low-rank group carries
    `rank` and optionally `update_proj_gap` (200), `alpha` (1.0) and `proj_type` (std).

    Hooks into training as a plain `torch.optim.Optimizer`. `metrics()` reports `stab/fira/limited`: residuals
    the norm-growth limiter scaled down since the last call (counted on the device, read at logging time)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True, no_deprecation_warning: bool = True,
                 compiled: bool = False):
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas={betas} must lie in [0, 1)")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))
        for group in self.param_groups:
            if "rank" in group:
                _check_low_rank_group(group)
        self.compiled = compiled
        self._limited = torch.zeros((), dtype=torch.int64)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if shard_group(p) is not None:
                    raise ValueError("Fira needs whole matrices (an SVD per tensor), not FSDP2 shards: use "
                                     "distributed=ddp or single")
                if "rank" in group:
                    self._low_rank_step(p, group)
                else:
                    self._adam_step(p, group)
        return loss

    def _step_size(self, state: dict, group: dict) -> float:
        beta1, beta2 = group["betas"]
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size = step_size * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
        return step_size

    def _scalars(self, state: dict, group: dict, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self._step_size(state, group), group["lr"] * group["weight_decay"]], dtype=like.dtype,
                            device=like.device)

    def _adam(self, state: dict, grad: torch.Tensor, group: dict) -> tuple[torch.Tensor, float]:
        """Step 2: the moments of grad, in place; returns N = m / (sqrt(v) + eps) and the step size."""
        self._init_moments(state, grad)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = v.sqrt().add_(group["eps"])
        return m / denom, self._step_size(state, group)

    @staticmethod
    def _init_moments(state: dict, like: torch.Tensor) -> None:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(like)
            state["exp_avg_sq"] = torch.zeros_like(like)

    def _apply(self, p: torch.Tensor, update: torch.Tensor, step_size: float, group: dict) -> None:
        p.add_(update, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    def _adam_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        state.setdefault("step", 0)
        if self.compiled:
            self._init_moments(state, p)
            state["step"] += 1
            compile_per_shape(adam_step_)(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                                          self._scalars(state, group, p), *group["betas"], group["eps"],
                                          group["weight_decay"] > 0.0)
            return
        normalized, step_size = self._adam(state, p.grad, group)
        self._apply(p, normalized, step_size, group)

    def _low_rank_step(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.dim() != 2:
            raise ValueError(f"Fira's low-rank group (the one with 'rank') takes matrices; got a tensor of shape "
                             f"{tuple(p.shape)}: put it in a group without 'rank'")
        state = self.state[p]
        g = p.grad
        state.setdefault("step", 0)
        if "exp_avg" not in state or state["step"] % group["update_proj_gap"] == 0:  # 1. (re)build the projector
            side = projection_side(g.shape, group["proj_type"])
            state.pop("ortho_left", None), state.pop("ortho_right", None)
            state[f"ortho_{side}"] = orthogonal_factor(g, group["rank"], side)
        side = "left" if "ortho_left" in state else "right"
        ortho = state[f"ortho_{side}"]
        low = project(g, ortho, side)
        normalized, step_size = self._adam(state, low, group)  # 2.
        alpha = group["alpha"]
        back_low, factor = project_back(low, ortho, side, alpha), scaling_factor(low, normalized)  # 3.
        if self.compiled:  # 3. to 5. fused
            state["residual_norm"], limited = compile_per_shape(residual_step_)(
                p, g, back_low, project_back(normalized, ortho, side, alpha), factor, state.get("residual_norm"),
                self._scalars(state, group, p), group["weight_decay"] > 0.0)
        else:
            residual = (g - back_low) * factor
            residual, state["residual_norm"], limited = limit_norm_growth(  # 4.
                residual, torch.norm(residual), state.get("residual_norm"))
            self._apply(p, project_back(normalized, ortho, side, alpha) + residual, step_size, group)  # 5.
        self._limited = self._limited.to(limited.device) + limited  # no host sync

    def metrics(self) -> dict[str, float]:
        limited = int(self._limited.item())  # host sync, at logging time only
        self._limited = torch.zeros_like(self._limited)
        return {"stab/fira/limited": limited}


def _check_low_rank_group(group: dict) -> None:
    for key, value in GROUP_DEFAULTS.items():
        group.setdefault(key, value)
    rank, gap, alpha, proj_type = group["rank"], group["update_proj_gap"], group["alpha"], group["proj_type"]
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"rank={rank!r} must be an integer >= 1 (the official scripts use 128 to 512)")
    if not (isinstance(gap, int) and gap >= 1):
        raise ValueError(f"update_proj_gap={gap!r} must be an integer >= 1 (steps between SVDs; 200 officially)")
    if not alpha > 0:
        raise ValueError(f"alpha={alpha!r} must be > 0 (the scale; 0.25 in the official pre-training scripts)")
    if proj_type == "full":
        raise ValueError("proj_type='full' does not work with Fira: the scaling factor of the rank x rank projected "
                         "gradient has no row or column of the full matrix to scale (the official code fails with a "
                         "shape error); use std, reverse_std, left or right")
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type={proj_type!r} must be one of {', '.join(PROJ_TYPES)}")
