"""Leading indicators of instability, measured at logged steps only (they cost host syncs and a copy of the
weights): the largest per-block gradient norm and which block it is, and the norm of the update the optimizer
applied. Update-norm spikes come before loss spikes and are larger in lower layers (marin#1368).

Under FSDP2 the gradients and weights are DTensor shards: every reduction goes through `full`, a collective that
every rank reaches alike.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate


def full(t: torch.Tensor) -> torch.Tensor:
    """A reduction over a DTensor as a plain tensor over the whole (a collective every rank reaches alike)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def replicated_like(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A plain tensor t (the same on every rank) in a form that combines with x: replicated over x's mesh when x is
    a DTensor shard (no communication), t itself otherwise."""
    if isinstance(x, DTensor):
        return DTensor.from_local(t, x.device_mesh, [Replicate()] * x.device_mesh.ndim, run_check=False)
    return t


def layer_grad_norms(model: torch.nn.Module) -> torch.Tensor:
    """The gradient norm of each transformer block, as one device tensor (no sync)."""
    return torch.stack([
        torch.linalg.vector_norm(torch.stack([full(torch.linalg.vector_norm(p.grad))
                                              for p in layer.parameters() if p.grad is not None]))
        for layer in model.layers
    ])


class UpdateNorm:
    """The worst block's gradient norm before the step, and the norm of the whole update after it."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        norms = layer_grad_norms(model)
        self.values = {"optim/worst_layer_grad_norm": norms.max().item(),  # host syncs, at logged steps only
                       "optim/worst_layer": int(norms.argmax().item())}
        self.before = [p.detach().clone() for p in model.parameters()]

    def after_step(self) -> dict[str, float]:
        update = torch.stack([full(torch.linalg.vector_norm(p.detach() - b))
                              for p, b in zip(self.model.parameters(), self.before)])
        self.values["optim/update_norm"] = full(torch.linalg.vector_norm(update)).item()  # host sync
        self.before = []
        return self.values
