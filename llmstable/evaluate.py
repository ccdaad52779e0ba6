"""Validation: the mean loss over a fixed set of held-out blocks (the losses themselves are in llmstable.losses)."""

from __future__ import annotations

import math

import torch

from llmstable.losses import cross_entropy, loss_function
from llmstable.preemption import EvalInterrupted
from llmstable.device import autocast_for


@torch.no_grad()
def validation_metrics(forward, blocks: torch.Tensor, micro_batch_size: int, device: torch.device, precision: str,
                       loss_cfg=None, between=None) -> dict[str, float]:
    """One evaluation as a metrics row's values: `val/loss` is the loss the run trains on, `val/ppl` the
    perplexity of the distribution the model samples from (its loss's `samples_from`: StableMax's or the softmax), and a
    run whose loss is not the cross-entropy also gets `val/softmax_ce`, the softmax cross-entropy of the same
    logits, so runs stay comparable. One host sync. `between(batch)`, if given, is asked after each batch but the
    last whether to stop: then EvalInterrupted is raised (llmstable.preemption)."""
    own = loss_function(loss_cfg) if loss_cfg is not None and loss_cfg.replaces_cross_entropy else None
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
    nll = loss if own is not None and loss_cfg.own_nll else softmax_ce  # NLL of the distribution sampled from
    out = {"val/loss": loss, "val/ppl": math.exp(min(nll, 50.0))}
    if own is not None:
        out["val/softmax_ce"] = softmax_ce
    return out
