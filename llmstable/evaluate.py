"""Losses and validation: the next-token cross-entropy, the loss a step trains on (a stabilizer may replace the
cross-entropy), and the mean loss over a fixed set of held-out blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmstable.preemption import EvalInterrupted
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
def validation_metrics(forward, blocks: torch.Tensor, micro_batch_size: int, device: torch.device, precision: str,
                       loss_cfg=None, between=None) -> dict[str, float]:
    """One evaluation as a metrics row's values: `val/loss` is the loss the run trains on, `val/ppl` the
    perplexity of the distribution the model samples from (StableMax for loss=stablemax, else the softmax), and a
    run whose loss is not the cross-entropy also gets `val/softmax_ce`, the softmax cross-entropy of the same
    logits, so runs stay comparable. One host sync. `between(batch)`, if given, is asked after each batch but the
    last whether to stop: then EvalInterrupted is raised (llmstable.preemption)."""
    from llmstable.stabilizers.losses import loss_function

    name = getattr(loss_cfg, "name", "cross_entropy")
    own = loss_function(loss_cfg) if name != "cross_entropy" else None
    sums = torch.zeros(2, device=device)
    for k, i in enumerate(range(0, len(blocks), micro_batch_size)):
        if k and between is not None and between(k - 1):
            raise EvalInterrupted(f"stopped after {k} of {-(-len(blocks) // micro_batch_size)} evaluation batches")
        batch = blocks[i: i + micro_batch_size].to(device)
        with autocast_for(device, precision):
            logits = forward(batch[:, :-1])
        ce = cross_entropy(logits, batch[:, 1:])
        sums += torch.stack([ce, own(logits, batch[:, 1:]).float() if own else ce]) * len(batch)
    softmax_ce, loss = (sums / len(blocks)).tolist()  # host sync, once per evaluation
    nll = loss if name == "stablemax" else softmax_ce  # the NLL of the distribution the model samples from
    out = {"val/loss": loss, "val/ppl": math.exp(min(nll, 50.0))}
    if own is not None:
        out["val/softmax_ce"] = softmax_ce
    return out
