"""Stabilizers that act through hooks (see `hooks.Stabilizer`): the replacing losses (StableMax, spherical Z-loss) and
the softmax-collapse monitor, z-loss, QK-norm, 4-bit weights, embedding-gradient shrink, OrthoGrad, the norm-growth
limiter, update clipping, QK-clip, the spike guard (with its early warning, SDC replay and spike localisation).
Optimizer-side stabilizers (SPAM, Stable-SPAM) live in `llmstable.optimizers`."""

from __future__ import annotations

import torch

from llmstable.config import StabilizerConfig, TrainConfig
from llmstable.indicators import max_attention_logits
from llmstable.model import Llama, build_model, llama_config
from llmstable.stabilizers.emb_grad_shrink import EmbGradShrink
from llmstable.stabilizers.hooks import Action, Capabilities, Stabilizer
from llmstable.stabilizers.losses import ReplacingLoss, SoftmaxCollapse
from llmstable.stabilizers.norm_growth import NormGrowthLimiter, limit_norm_growth
from llmstable.stabilizers.orthograd import OrthoGrad, orthogonalize
from llmstable.stabilizers.qk_clip import QKClip, qk_clip_scales
from llmstable.stabilizers.qk_norm import QKNorm
from llmstable.stabilizers.quant4 import Quant4
from llmstable.stabilizers.spike import SpikeGuard
from llmstable.stabilizers.update_clip import UpdateClip, update_clip_scale
from llmstable.stabilizers.zloss import ZLoss, z_loss

__all__ = ["Action", "Capabilities", "EmbGradShrink", "NormGrowthLimiter", "OrthoGrad", "QKClip", "QKNorm", "Quant4",
           "ReplacingLoss", "SoftmaxCollapse", "SpikeGuard", "Stabilizer", "UpdateClip", "ZLoss",
           "build_model_and_stabilizers", "build_stabilizers", "limit_norm_growth", "max_attention_logits",
           "orthogonalize", "qk_clip_scales", "update_clip_scale", "z_loss"]


def build_stabilizers(cfg: StabilizerConfig, capabilities: Capabilities = Capabilities()) -> list[Stabilizer]:
    """The active stabilizers, in the fixed order they are applied: architecture first, then model transforms
    (quantization, the embedding shrink, then QK-clip's measuring hooks on the final modules), then loss hooks, then
    gradient hooks (OrthoGrad changes each gradient's direction, then the limiter bounds its norm's growth), then
    the update hooks (update clipping bounds what the optimizer did, then QK-clip rescales the attention heads),
    then the spike guard. `capabilities` says what the run's engine allows them to ask for."""
    out: list[Stabilizer] = []
    if cfg.softmax_collapse is not None:  # first: it reads the targets in compute_loss, before a loss provider
        out.append(SoftmaxCollapse())
    if cfg.qk_norm is not None:
        out.append(QKNorm())
    if cfg.quant4 is not None:
        out.append(Quant4(cfg.quant4.group_size, cfg.quant4.act_bits))
    if cfg.emb_grad_shrink is not None:
        out.append(EmbGradShrink(cfg.emb_grad_shrink.alpha))
    if cfg.zloss is not None:
        out.append(ZLoss(cfg.zloss.coef))
    if cfg.orthograd is not None:
        out.append(OrthoGrad())
    if cfg.norm_growth_limiter is not None:
        out.append(NormGrowthLimiter(cfg.norm_growth_limiter.gamma))
    if cfg.update_clip is not None:
        c = cfg.update_clip
        out.append(UpdateClip(c.k, c.window, c.min_history))
    if cfg.qk_clip is not None:
        out.append(QKClip(cfg.qk_clip.tau, cfg.qk_clip.alpha, cfg.qk_clip.interval))
    if cfg.spike_guard is not None:
        out.append(SpikeGuard(cfg.spike_guard, capabilities))
    return out


def build_model_and_stabilizers(cfg: TrainConfig, vocab_size: int, device: torch.device | str = "cpu",
                                capabilities: Capabilities = Capabilities(),
                                extra: tuple = ()) -> tuple[Llama, list[Stabilizer]]:
    """The model as the run trains it: config hooks, build (seeded by the caller), then model transforms. `extra`
    are stabilizers the caller built (plug-ins outside the package), applied after the configured ones."""
    stabilizers = [*build_stabilizers(cfg.stabilizer, capabilities), *extra]
    if cfg.loss.replaces_cross_entropy:  # the replacing loss goes before any other compute_loss
        stabilizers.insert(int(cfg.stabilizer.softmax_collapse is not None), ReplacingLoss(cfg.loss))
    model_cfg = llama_config(cfg.model, vocab_size)
    for stabilizer in stabilizers:
        stabilizer.configure_model(model_cfg)
    model = build_model(model_cfg, device)
    for stabilizer in stabilizers:
        model = stabilizer.transform_model(model)
    return model, stabilizers
