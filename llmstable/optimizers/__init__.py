"""Optimizers, built from the `optimizer` group: AdamW (the baseline), SPAM, Stable-SPAM, Fira, S3, 8-bit AdamW, Muon
(torch's, with AdamW beside it), Adam-mini (the official partition; pytorch-optimizer's old one as a variant), and
Lion and SOAP from pytorch-optimizer (each checked against a reference of its paper's update in
tests/optimizers/test_library_optimizers.py).

Each optimizer is built by the function registered for its schema's name (`@builds("NAME")`): a new optimizer is
its schema (llmstable.config.optimizer, with what it needs declared as data) and its builder, nothing else."""

from __future__ import annotations

import torch

from collections.abc import Callable

from llmstable.config import (
    AdamMiniConfig, AdamW8bitConfig, AdamWConfig, ConfigError, FiraConfig, LionConfig, MuonConfig, OptimizerConfig,
    S3Config, SOAPConfig, SPAMConfig, StableSPAMConfig,
)
from llmstable.model.roles import BLOCK_ROLES, param_roles
from llmstable.optimizers.adam_mini import AdamMini
from llmstable.optimizers.fira import Fira
from llmstable.optimizers.muon import MuonWithAdamW
from llmstable.optimizers.s3 import S3
from llmstable.optimizers.spam import SPAM
from llmstable.optimizers.stable_spam import StableSPAM

__all__ = ["S3", "SPAM", "AdamMini", "Fira", "MuonWithAdamW", "StableSPAM", "build_optimizer", "builds",
           "fira_param_groups", "param_groups"]

BUILDERS: dict[str, Callable] = {}  # optimizer.name -> (cfg, model, device, total_steps) -> torch.optim.Optimizer


def builds(name: str):
    """Decorator: register the function that builds the optimizer `optimizer.name=NAME` chooses."""

    def add(fn: Callable) -> Callable:
        BUILDERS[name] = fn
        return fn

    return add


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings (dim >= 2), none on norm weights (dim 1)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def spam_param_groups(model: torch.nn.Module, weight_decay: float, density: float | None) -> list[dict]:
    """As param_groups, with the attention and MLP matrices in a group of their own carrying `density` (the
    matrices the official SPAM script makes sparse), when density is set."""
    if density is None:
        return param_groups(model, weight_decay)
    blocks = block_matrices(model)
    ids = {id(p) for p in blocks}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        {"params": blocks, "weight_decay": weight_decay, "density": density},
    ]


def block_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The attention and MLP projection matrices: what the official SPAM density and GaLore/Fira scripts select
    (the weights of the linears whose names contain "attn" or "mlp" in HF LLaMA naming), as the model's own
    parameter roles say (llmstable.model.param_roles), not by matching names."""
    roles = param_roles(model)
    return [p for n, p in model.named_parameters() if p.dim() == 2 and roles[n] in BLOCK_ROLES]


def fira_param_groups(model: torch.nn.Module, cfg: FiraConfig) -> list[dict]:
    """As param_groups, with the attention and MLP matrices in Fira's low-rank group (rank, update_proj_gap,
    alpha, proj_type), as the official pre-training script groups them; embeddings, LM head and norms get Adam."""
    blocks = block_matrices(model)
    ids = {id(p) for p in blocks}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        {"params": blocks, "weight_decay": cfg.weight_decay, "rank": cfg.rank,
         "update_proj_gap": cfg.update_proj_gap, "alpha": cfg.alpha, "proj_type": cfg.proj_type},
    ]


def build_optimizer(cfg: OptimizerConfig, model: torch.nn.Module, device: torch.device,
                    total_steps: int) -> torch.optim.Optimizer:
    builder = BUILDERS.get(cfg.name)
    if builder is None:
        raise ConfigError([f"optimizer.name={cfg.name!r} has no builder: register one with "
                           "llmstable.optimizers.builds"])
    return builder(cfg, model, device, total_steps)


def _compiled(cfg: OptimizerConfig, device: torch.device) -> bool:
    compiled = getattr(cfg, "compiled", False)
    return device.type == "cuda" if compiled == "auto" else bool(compiled)


@builds("adamw")
def _adamw(cfg: AdamWConfig, model, device, total_steps) -> torch.optim.Optimizer:
    impl = {"auto": {"fused": True}, "fused": {"fused": True}, "foreach": {"foreach": True},
            "for_loop": {"foreach": False}}[cfg.impl]
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **impl)


@builds("spam")
def _spam(cfg: SPAMConfig, model, device, total_steps) -> SPAM:
    return SPAM(spam_param_groups(model, cfg.weight_decay, cfg.density), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                correct_bias=cfg.correct_bias, warmup_steps=cfg.warmup_steps, threshold=cfg.threshold,
                DeltaT=cfg.DeltaT, grad_accu_steps=cfg.grad_accu_steps, compiled=_compiled(cfg, device))


@builds("stable_spam")
def _stable_spam(cfg: StableSPAMConfig, model, device, total_steps) -> StableSPAM:
    total_T = total_steps if cfg.total_T == "auto" else cfg.total_T
    return StableSPAM(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                      amsgrad=cfg.amsgrad, gamma1=cfg.gamma1, gamma2=cfg.gamma2, gamma3=cfg.gamma3, total_T=total_T,
                      eta_min=cfg.eta_min, update_proj_gap=cfg.update_proj_gap, compiled=_compiled(cfg, device))


@builds("fira")
def _fira(cfg: FiraConfig, model, device, total_steps) -> Fira:
    return Fira(fira_param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                weight_decay=cfg.weight_decay, correct_bias=cfg.correct_bias, compiled=_compiled(cfg, device))


@builds("s3")
def _s3(cfg: S3Config, model, device, total_steps) -> S3:
    return S3(param_groups(model, cfg.weight_decay), lr=cfg.lr, beta=cfg.beta, p=cfg.p, eps=cfg.eps,
              weight_decay=cfg.weight_decay, nesterov=cfg.nesterov, compiled=_compiled(cfg, device))


@builds("adamw8bit")
def _adamw8bit(cfg: AdamW8bitConfig, model, device, total_steps) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    common = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.backend == "bitsandbytes":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **common)
    from torchao.optim import AdamW8bit  # DTensor-aware: the one that works under FSDP2

    return AdamW8bit(groups, **common)


@builds("muon")
def _muon(cfg: MuonConfig, model: torch.nn.Module, device: torch.device, total_steps: int) -> MuonWithAdamW:
    """Muon on the attention and MLP matrices; AdamW on the rest (embeddings and LM head decayed, norms not)."""
    blocks = block_matrices(model)
    ids = {id(p) for p in blocks}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    ns_dtype = ("fp32" if device.type == "cpu" else "bf16") if cfg.ns_dtype == "auto" else cfg.ns_dtype
    adamw_groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                    {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    return MuonWithAdamW(blocks, adamw_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                         ns_steps=cfg.ns_steps, adjust_lr_fn=cfg.adjust_lr_fn, weight_decay=cfg.weight_decay,
                         betas=cfg.betas, eps=cfg.eps, ns_dtype=ns_dtype)


@builds("adam_mini")
def _adam_mini(cfg: AdamMiniConfig, model: torch.nn.Module, device, total_steps) -> torch.optim.Optimizer:
    """Adam-mini with the official blocks, from the model's parameter roles and shape; backend=pytorch_optimizer:
    pytorch-optimizer 4.1's (the old partition), which splits query and key by head from the shape (and finds them
    by llmstable.model's names)."""
    inner = getattr(model, "module", model)
    shape = inner.cfg
    if cfg.backend == "pytorch_optimizer":
        import pytorch_optimizer

        return pytorch_optimizer.AdamMini(model, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                          weight_decay=cfg.weight_decay, num_embeds=shape.dim,
                                          num_heads=shape.n_heads, num_query_groups=shape.n_kv_heads or shape.n_heads)
    return AdamMini(inner.named_parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    dim=shape.dim, n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads, roles=inner.param_roles(),
                    value_blocks=cfg.value_blocks)


@builds("lion")
def _lion(cfg: LionConfig, model: torch.nn.Module, device, total_steps) -> torch.optim.Optimizer:
    """Lion from pytorch-optimizer (pinned in pyproject.toml)."""
    import pytorch_optimizer

    return pytorch_optimizer.Lion(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                  weight_decay=cfg.weight_decay)


@builds("soap")
def _soap(cfg: SOAPConfig, model: torch.nn.Module, device, total_steps) -> torch.optim.Optimizer:
    """SOAP from pytorch-optimizer (pinned in pyproject.toml)."""
    import pytorch_optimizer

    return pytorch_optimizer.SOAP(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, precondition_frequency=cfg.precondition_frequency,
                                  max_precondition_dim=cfg.max_precondition_dim)
