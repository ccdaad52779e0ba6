"""Leading indicators of instability, measured at logged steps only (they cost host syncs and a copy of the
weights): the largest per-block gradient norm and which block it is, and the norm of the update the optimizer
applied. Update-norm spikes come before loss spikes and are larger in lower layers (marin#1368).

Under FSDP2 the gradients and weights are DTensor shards: the per-block norms (llmstable.parallel.dtensors'
`block_norms`) take one collective for all blocks together, which every rank reaches alike.
"""

from __future__ import annotations

import torch

from llmstable.parallel.dtensors import block_norms


def layer_grad_norms(model: torch.nn.Module) -> torch.Tensor:
    """The gradient norm of each transformer block, as one device tensor (no sync)."""
    return block_norms([[p.grad for p in layer.parameters() if p.grad is not None] for layer in model.layers])


class UpdateNorm:
    """The worst block's gradient norm before the step, and the norm of the whole update after it."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        norms = layer_grad_norms(model)
        self.values = {"optim/worst_layer_grad_norm": norms.max().item(),  # host syncs, at logged steps only
                       "optim/worst_layer": int(norms.argmax().item())}
        self.before = [p.detach().clone() for p in model.parameters()]

    def after_step(self) -> dict[str, float]:
        update = block_norms([[p.detach() - b for p, b in zip(self.model.parameters(), self.before)]])
        self.values["optim/update_norm"] = update[0].item()  # host sync
        self.before = []
        return self.values
