"""Adam-mini (Zhang et al. 2024, "Adam-mini: Use Fewer Learning Rates To Gain More", arXiv 2406.16793), partitioned
and stepped as the authors' official code does today (zyushun/Adam-mini, `adam_mini/adam_mini.py`, version 1.1.1,
read at commit 402aadf).

Adam's first moment per entry, one second moment per block: v_b is the EMA of the mean of g^2 over block b. The
blocks, by what the tensor is (the model says: `Llama.param_roles`), as the official rules give them since 1.1.0:
- embedding and output layer (LM head): one block per token, i.e. per row;
- query and key: one block per head, dim * dim / n_heads consecutive entries (head_dim rows);
- value, attention output and the MLP matrices: one block per output neuron, i.e. per row;
- everything else (the norms' weights): one block for the whole tensor;
- biases: Adam, one block per entry (llmstable's model has none).
With value_blocks="whole", the value matrix is one block: the authors' README advises it (`optimizer.wv_names = {}`)
for runs shorter than 10k-20k steps.

One step of a tensor p with a gradient g, in the official order (`adam_mini_update_`, a pure function):
  v <- beta2 v + (1 - beta2) mean_block(g^2);  k <- k + 1;  p <- p (1 - lr wd)  (decoupled, not on norms);
  m <- m + (1 - beta1) (g - m);  p <- p - lr / (1 - beta1^k) * m / (sqrt(v) / sqrt(1 - beta2^k) + eps).
A tensor without a gradient is skipped, and its k does not advance. Constructor names and defaults are the official
class's (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0; `dim`, `n_heads`, `n_kv_heads`); one param group
per tensor, as there, with its name, its block count and its weight decay.

Deviations (none changes a step of llmstable's model):
- the partition comes from the model's roles, not from substrings of the lower-cased names ("embed", "wq", "wv",
  "feed_forward", "norm", ...); on llmstable's names the official rules give the same blocks and the same weight
  decay (tests/optimizers/test_adam_mini.py applies them by hand);
- no collectives: for the norms the official code all-reduces sum(g^2) over every visible GPU. Adam-mini runs here
  in one process or under DDP (sharded engines are refused), where every rank holds the same averaged gradient, so
  the reduced mean is the local one;
- m is kept in p's shape (the official code views it per head for query and key): storage only;
- `model_sharding` (deprecated upstream) and `verbose` (printing the blocks found) are left out.

pytorch-optimizer 4.1's AdamMini, the other `optimizer.backend`, keeps the pre-1.1.0 partition: Adam per entry on
the embedding and output layer, and the value, attention output and MLP matrices one block each.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim import Optimizer

ROLES = ("embedding", "output", "query", "key", "value", "attention_output", "mlp", "norm", "bias")


def block_count(role: str, shape: torch.Size, head_numel: int, value_blocks: str = "neuron") -> int:
    """How many second moments a tensor gets: its rows (a token, an output neuron), its heads, its entries (a bias),
    or 1 (the whole tensor)."""
    numel = math.prod(shape)
    if role == "bias":
        return numel
    if role in ("query", "key"):
        if numel % head_numel:
            raise ValueError(f"a {role} tensor of shape {tuple(shape)} does not split into heads of {head_numel} "
                             "entries (dim * dim / n_heads): check dim and n_heads")
        return numel // head_numel
    if role in ("embedding", "output", "attention_output", "mlp") or (role == "value" and value_blocks == "neuron"):
        return shape[0]
    return 1


def adam_mini_update_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, k: int, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One Adam-mini step of one tensor, in place on p, m (p's shape) and v (blocks, 1), k the step after this one
    is counted. Row-major blocks: block b is entries [b * n, (b + 1) * n) of the flattened tensor."""
    blocks = v.shape[0]
    v.mul_(beta2).add_(g.reshape(blocks, -1).square().mean(dim=1, keepdim=True), alpha=1 - beta2)
    if weight_decay > 0:
        p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    h = v.sqrt().div_(math.sqrt(1 - beta2**k)).add_(eps)  # (blocks, 1)
    p.add_((m.reshape(blocks, -1) / h).view_as(p), alpha=-lr / (1 - beta1**k))


class AdamMini(Optimizer):
    """Adam-mini with the official blocks (module docstring). `roles` maps each name of `named_parameters` to one
    of ROLES (the model's `param_roles()`); norms get no weight decay."""

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, *,
                 dim: int = 2048, n_heads: int = 32, n_kv_heads: int | None = None, roles: dict[str, str],
                 value_blocks: str = "neuron"):
        if not lr >= 0 or not all(0.0 <= b < 1.0 for b in betas) or weight_decay < 0 or eps < 0:
            raise ValueError(f"Adam-mini needs lr >= 0, betas in [0, 1), eps >= 0 and weight_decay >= 0; got lr={lr}, "
                             f"betas={betas}, eps={eps}, weight_decay={weight_decay}")
        if n_kv_heads is not None and n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
        if value_blocks not in ("neuron", "whole"):
            raise ValueError(f"value_blocks={value_blocks!r} must be neuron (official) or whole (wv_names = {{}})")
        self.dim, self.n_heads, self.n_kv_heads = dim, n_heads, n_kv_heads or n_heads
        head_numel = dim * dim // n_heads
        groups = []
        for name, p in named_parameters:
            if not p.requires_grad:
                continue
            role = roles.get(name)
            if role not in ROLES:
                raise ValueError(f"Adam-mini has no block rule for parameter {name!r} (role {role!r}): the model's "
                                 f"param_roles() must give one of {', '.join(ROLES)}")
            groups.append({"params": [p], "name": name, "role": role,
                           "blocks": block_count(role, p.shape, head_numel, value_blocks),
                           "weight_decay": 0.0 if role in ("norm", "bias") else weight_decay})
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["vmean"] = torch.zeros(group["blocks"], 1, dtype=p.dtype, device=p.device)
                state["step"] += 1
                adam_mini_update_(p, p.grad, state["m"], state["vmean"], state["step"], group["lr"], beta1, beta2,
                                  group["eps"], group["weight_decay"])
        return loss
