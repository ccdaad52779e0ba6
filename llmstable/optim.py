"""Optimizer construction. AdamW is the baseline every other optimizer is compared against."""

from __future__ import annotations

import torch

from llmstable.config import OptimizerConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings (dim >= 2), none on norm weights (dim 1)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: OptimizerConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        impl = {"auto": {"fused": True}, "fused": {"fused": True}, "foreach": {"foreach": True},
                "for_loop": {"foreach": False}}[cfg.impl]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **impl)
    raise ValueError(f"optimizer.name={cfg.name!r} is not one of: adamw")
