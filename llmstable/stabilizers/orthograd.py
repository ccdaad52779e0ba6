"""OrthoGrad, "⊥Grad" (Prieto et al. 2025, arXiv 2501.04697, "Grokking at the edge of numerical stability"): each
parameter's gradient is projected orthogonally to the parameter itself, then rescaled to the gradient's own norm,
so an update can no longer just grow the weights along their current direction (the naive loss minimization
that ends in softmax collapse).

Per tensor, flattened, as the official `orthograd.py` (LucasPrietoAl/grokking-at-the-edge-of-numerical-stability),
with its epsilons: g_orth = g - (w.g / (w.w + 1e-30)) w, then g <- g_orth ||g|| / (||g_orth|| + 1e-30).

The official code is an optimizer wrapper that transforms every parameter's gradient right before the base
optimizer's step. Here it is a gradient hook, so it composes with any optimizer: it runs after backward and
before gradient clipping (the official training script does not clip). A zero weight (w.g = 0) leaves the
gradient unchanged, as officially.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate

from llmstable.stabilizers.hooks import Stabilizer


def orthogonalize(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g projected orthogonally to w and rescaled to ||g|| (flattened; returned in g's shape).

    FSDP2 shards (DTensor) cannot be flattened when unevenly split, so there the dot products are sums of
    products, which DTensor reduces across the shards (equal to the flat form up to summation order)."""
    if isinstance(g, DTensor):
        proj = _replicated((w * g).sum()) / (_replicated((w * w).sum()) + 1e-30)
        g_orth = g - proj * w
        return g_orth * (_replicated(torch.linalg.vector_norm(g)) / (_replicated(torch.linalg.vector_norm(g_orth)) + 1e-30))
    w, flat = w.reshape(-1), g.reshape(-1)
    proj = torch.dot(w, flat) / (torch.dot(w, w) + 1e-30)
    g_orth = flat - proj * w
    return (g_orth * (flat.norm(2) / (g_orth.norm(2) + 1e-30))).view_as(g)


def _replicated(x: DTensor) -> DTensor:
    """A scalar reduced over the shards, held whole on every rank (so that scaling a shard keeps it a shard)."""
    return x.redistribute(x.device_mesh, [Replicate()] * x.device_mesh.ndim)


class OrthoGrad(Stabilizer):
    """Hook `on_gradients(model)`: once per optimizer step, after backward (gradients already reduced across ranks)
    and before clipping, replaces every parameter's gradient with `orthogonalize(weight, gradient)`. No state,
    no metrics."""

    name = "orthograd"

    @torch.no_grad()
    def on_gradients(self, model: torch.nn.Module) -> None:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.copy_(orthogonalize(p, p.grad))
