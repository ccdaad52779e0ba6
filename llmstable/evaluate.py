"""Losses and validation: the next-token cross-entropy, the loss a step trains on (a stabilizer may replace the
cross-entropy), and the mean loss over a fixed set of held-out blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmstable.runtime import autocast_for


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


@torch.no_grad()
def validation_loss(forward, blocks: torch.Tensor, micro_batch_size: int, device: torch.device,
                    precision: str) -> torch.Tensor:
    """The mean cross-entropy over `blocks` (n, seq_len + 1), in micro-batches; a device tensor (no sync)."""
    losses, count = [], 0
    for i in range(0, len(blocks), micro_batch_size):
        batch = blocks[i: i + micro_batch_size].to(device)
        with autocast_for(device, precision):
            losses.append(cross_entropy(forward(batch[:, :-1]), batch[:, 1:]) * len(batch))
        count += len(batch)
    return torch.stack(losses).sum() / count
