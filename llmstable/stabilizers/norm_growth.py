"""The norm-growth limiter of Fira (Chen et al. 2024, arXiv 2410.01623, section 4.3), on its own: a gradient
whose norm grew by more than a factor gamma since the last step is scaled back to gamma times the last norm.

Fira applies it to the scaled residual of each low-rank matrix, inside the optimizer; both use one arithmetic,
`limit_norm_growth` (llmstable.optimizers.norm_growth, the optimizer's own mechanism). As a stabilizer it applies to the raw gradient of
every parameter, for any optimizer, through the `on_gradients` hook.

Granularity: one norm per parameter tensor. That is Fira's granularity (one residual per weight matrix), and it
keeps a spike in one layer from hiding behind the norm of all the others, which a global norm would allow; a
per-entry limit would be a different method (an elementwise clip, which SPAM already is). Every tensor, matrices,
embeddings and norm weights alike, has its own history.

The remembered norm is the norm after limiting, as in Fira: growth is limited relative to what was applied. The
first step of a tensor only records its norm.
"""

from __future__ import annotations

import torch

from llmstable.optimizers.norm_growth import limit_norm_growth
from llmstable.stabilizers.hooks import Stabilizer


class NormGrowthLimiter(Stabilizer):
    """Hook `on_gradients(model)`: once per optimizer step, after backward (gradients already reduced across
    ranks) and before clipping, scales each parameter's gradient in place with `limit_norm_growth`.

    Metric `stab/norm_growth_limiter/limited`: tensors limited since the last log row (counted on the device,
    read at logging time). `state_dict()` holds the last norm of every tensor, by parameter name, as floats
    (it travels in the checkpoint's state.json; the one host sync happens then), so a resumed run continues
    bit-identically."""

    name = "norm_growth_limiter"

    def __init__(self, gamma: float = 1.01):
        if not gamma >= 1.0:
            raise ValueError(f"gamma={gamma} must be >= 1 (1.01 in Fira)")
        self.gamma = gamma
        self.prev_norms: dict[str, torch.Tensor] = {}
        self._limited = torch.zeros((), dtype=torch.int64)

    @torch.no_grad()
    def on_gradients(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            norm = torch.linalg.vector_norm(p.grad, dtype=torch.float32)  # fp32 whatever the grad dtype
            prev = self.prev_norms.get(name)
            grad, self.prev_norms[name], limited = limit_norm_growth(
                p.grad, norm, None if prev is None else prev.to(norm.device), self.gamma)
            if prev is not None:
                p.grad.copy_(grad)
            self._limited = self._limited.to(limited.device) + limited  # no host sync

    def metrics(self) -> dict[str, float]:
        limited = int(self._limited.item())  # host sync, at logging time only
        self._limited = torch.zeros_like(self._limited)
        return {"stab/norm_growth_limiter/limited": limited}

    def state_dict(self) -> dict:
        return {"prev_norms": {name: float(norm) for name, norm in self.prev_norms.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.prev_norms = {name: torch.tensor(value, dtype=torch.float32)
                           for name, value in state.get("prev_norms", {}).items()}
