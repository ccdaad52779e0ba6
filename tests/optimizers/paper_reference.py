"""Short references of the papers' updates for the optimizers llmstable takes from libraries (torch.optim.Muon;
Lion, SOAP and Adam-mini from pytorch-optimizer), written from the papers' algorithm boxes, one tensor at a time,
in whatever dtype the caller gives (float64 in the tests). Each takes the gradients of every step and returns the
parameter after each step."""

from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan et al.'s quintic


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """The quintic iteration towards the nearest semi-orthogonal matrix, on the wide orientation."""
    a, b, c = NS_COEFFICIENTS
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def muon(p: torch.Tensor, grads: list[torch.Tensor], lr: float, beta: float = 0.95, weight_decay: float = 0.0,
         scale: str = "match_rms_adamw") -> list[torch.Tensor]:
    """Muon (kellerjordan.github.io/posts/muon): momentum as an EMA, a Nesterov look-ahead, orthogonalize, scale by
    the shape (Jordan: sqrt(max(1, A/B)); Liu et al. 2025, arXiv 2502.16982: 0.2 sqrt(max(A, B))), decoupled decay."""
    m, out = torch.zeros_like(p), []
    rows, cols = p.shape
    factor = math.sqrt(max(1.0, rows / cols)) if scale == "original" else 0.2 * math.sqrt(max(rows, cols))
    for g in grads:
        m = beta * m + (1 - beta) * g
        update = newton_schulz((1 - beta) * g + beta * m)
        p = p * (1 - lr * weight_decay) - lr * factor * update
        out.append(p)
    return out


def lion(p: torch.Tensor, grads: list[torch.Tensor], lr: float, betas=(0.9, 0.99),
         weight_decay: float = 0.0) -> list[torch.Tensor]:
    """Lion (Chen et al. 2023, arXiv 2302.06675, algorithm 2)."""
    m, out = torch.zeros_like(p), []
    for g in grads:
        c = betas[0] * m + (1 - betas[0]) * g
        p = p - lr * (torch.sign(c) + weight_decay * p)
        m = betas[1] * m + (1 - betas[1]) * g
        out.append(p)
    return out


def soap(p: torch.Tensor, grads: list[torch.Tensor], lr: float, betas=(0.95, 0.95), eps: float = 1e-8,
         weight_decay: float = 0.0, frequency: int = 10) -> list[torch.Tensor]:
    """SOAP (Vyas et al. 2024, arXiv 2409.11321, algorithms 3 and 4) for one matrix: Adam on the gradient rotated
    into the eigenbases of Shampoo's L = E[G G^T] and R = E[G^T G] (EMAs with beta2); the bases come from an
    eigendecomposition on the first step, which makes no update, then from one power iteration and a QR every
    `frequency` steps, with the second moment reordered as the estimated eigenvalues are sorted."""
    b1, b2 = betas
    gg = [torch.zeros(n, n, dtype=p.dtype) for n in p.shape]
    q, m, v, out = None, torch.zeros_like(p), torch.zeros_like(p), []

    def accumulate(g):
        gg[0].mul_(b2).add_((1 - b2) * g @ g.T)
        gg[1].mul_(b2).add_((1 - b2) * g.T @ g)

    for t, g in enumerate(grads):
        if t == 0:
            accumulate(g)
            q = [torch.flip(torch.linalg.eigh(s)[1], dims=[1]) for s in gg]  # descending eigenvalues
            out.append(p)
            continue
        rotated = q[0].T @ g @ q[1]
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * rotated**2
        step = (q[0].T @ m @ q[1]) / (v.sqrt() + eps)
        size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        p = p - size * (q[0] @ step @ q[1].T)
        p = p * (1 - lr * weight_decay)
        accumulate(g)
        if t % frequency == 0:
            for side in (0, 1):
                power = gg[side] @ q[side]
                order = torch.argsort((q[side] * power).sum(0), descending=True)
                v = v.index_select(side, order)
                q[side] = torch.linalg.qr(power[:, order])[0]
        out.append(p)
    return out


def adam_mini_block(p: torch.Tensor, grads: list[torch.Tensor], lr: float, blocks: int | None, betas=(0.9, 0.999),
                    eps: float = 1e-8, weight_decay: float = 0.0) -> list[torch.Tensor]:
    """Adam-mini (Zhang et al. 2024, arXiv 2406.16793, algorithm 1) for one tensor: Adam's first moment, but one
    second moment per block, the EMA of the mean of g^2 over the block. blocks=None: one block per entry (Adam, for
    embeddings and the output layer); otherwise the tensor's rows split into `blocks` equal blocks (heads)."""
    b1, b2 = betas
    m, out = torch.zeros_like(p), []
    shape = p.shape
    v = torch.zeros_like(p) if blocks is None else torch.zeros(blocks, 1, dtype=p.dtype)
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        if blocks is None:
            v = b2 * v + (1 - b2) * g**2
            denom = v.sqrt() / math.sqrt(1 - b2**t) + eps
        else:
            v = b2 * v + (1 - b2) * (g.reshape(blocks, -1) ** 2).mean(1, keepdim=True)
            denom = (v.sqrt() / math.sqrt(1 - b2**t) + eps).expand(blocks, p.numel() // blocks).reshape(shape)
        p = p * (1 - lr * weight_decay) - lr / (1 - b1**t) * m / denom
        out.append(p)
    return out
