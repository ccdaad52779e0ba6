"""QK-clip (MuonClip, Kimi K2 technical report, arXiv 2507.20534; attention-logit growth: Wortsman et al. 2023,
arXiv 2309.14322, and Dehghani et al. 2023): after each update, every attention head whose largest pre-softmax
logit of the step exceeded tau has its query and key projections rescaled so that the logit comes back to tau.

Per layer and head h, S_h = max over the step's sequences, query positions i and key positions j <= i of
q_i . k_j / sqrt(head_dim) (the logit SDPA exponentiates, RoPE applied). With gamma_h = min(1, tau / S_h), Kimi K2
multiplies W_q's rows of head h by gamma_h^alpha and W_k's by gamma_h^(1 - alpha), alpha = 0.5: the head's
logits, which are bilinear in W_q and W_k, are scaled by exactly gamma_h, and heads under tau are untouched.

Grouped-query attention (n_kv_heads < n_heads, which Kimi's MLA does not have): one key head serves a group of
query heads, so its rows cannot be scaled per query head. We scale the key head by (min over its group of
gamma)^(1 - alpha) and each query head h by gamma_h over that, so every head's logits are still scaled by exactly
its own gamma_h (a query head under tau in a clipped group is scaled up by as much as its key was scaled down).
With one query head per key head this is Kimi's rule.

Cost. The maxima come from `indicators.AttentionLogits`, the measurement the logged steps' `stab/attn_logit_max`
indicator also reads (one per model, so a step both want is measured once): forward hooks keep the outputs of
`wq` and `wk`, and the attention's hook takes the causal max of q k^T after RoPE in fp32. That is one extra QK^T
product per layer in the forward pass; `interval` > 1 measures (and clips) only every interval-th update.
`make bench` reports the overhead.

Not with QK-norm: after an RMSNorm over the head dimension, rescaling W_q or W_k changes nothing (and QK-norm
already bounds the logits). The config check refuses the pair. Distributed: each rank measures its own share of the
batch; the per-head maxima are all-reduced (max) in `on_gradients`, which every rank reaches alike, so every rank
rescales alike. Under FSDP2 the rescale multiplies the DTensor shards by a replicated row scale.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from llmstable.indicators import AttentionLogits
from llmstable.parallel.dtensors import replicated_like
from llmstable.stabilizers.hooks import Stabilizer


def qk_clip_scales(max_logits: torch.Tensor, n_kv_heads: int, tau: float,
                   alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query head and per key head, the factors for W_q's and W_k's rows, and which heads are clipped.
    Heads at or under tau get exactly 1.0 (and so do key heads whose whole group is under tau)."""
    clipped = max_logits > tau
    gamma = torch.where(clipped, tau / max_logits, torch.ones_like(max_logits))
    group = max_logits.numel() // n_kv_heads
    if group == 1:
        return gamma.pow(alpha), gamma.pow(1.0 - alpha), clipped
    k_scale = gamma.view(n_kv_heads, group).amin(dim=1).pow(1.0 - alpha)
    return gamma / k_scale.repeat_interleave(group), k_scale, clipped


def scale_rows_(weight: torch.Tensor, head_scale: torch.Tensor, head_dim: int) -> None:
    """Multiply each head's block of rows of a projection weight (heads * head_dim, dim) by its factor."""
    weight.mul_(replicated_like(weight, head_scale.repeat_interleave(head_dim).to(weight.dtype).unsqueeze(1)))


class QKClip(Stabilizer):
    """Hooks: `transform_model` asks the model's `AttentionLogits` to measure on this stabilizer's updates;
    `on_gradients` closes the step's measurement (all-reducing it across ranks); `on_update` rescales.

    Metrics at logging time: `stab/qk_clip/max_logit` and `stab/qk_clip/max_logit/layer_<i>` (the largest logit
    measured since the last row) and `stab/qk_clip/clipped_heads` (heads rescaled since the last row).
    `state_dict()`: the update count (which steps measure, with interval > 1)."""

    name = "qk_clip"

    def __init__(self, tau: float = 100.0, alpha: float = 0.5, interval: int = 1):
        if not tau > 0:
            raise ValueError(f"tau={tau} must be > 0 (100 in Kimi K2)")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha} must lie in [0, 1] (0.5 in Kimi K2)")
        if interval < 1:
            raise ValueError(f"interval={interval} must be >= 1")
        self.tau, self.alpha, self.interval = tau, alpha, interval
        self.updates = 0
        self.attentions: list[torch.nn.Module] = []
        self.probe: AttentionLogits | None = None
        self.reader = 0  # ours, for probe.close
        self._step_max: torch.Tensor | None = None  # the step's (layers, heads) maxima, once its backward is done
        self._log_max: torch.Tensor | None = None
        self._clipped = torch.zeros((), dtype=torch.int64)

    @property
    def measuring(self) -> bool:
        return self.updates % self.interval == 0

    def transform_model(self, model: torch.nn.Module) -> torch.nn.Module:
        self.attentions = [layer.attention for layer in model.layers]
        if any(attention.q_norm is not None for attention in self.attentions):
            raise ValueError("qk_clip cannot act with qk_norm: rescaling W_q and W_k changes nothing after the "
                             "norm (and QK-norm already bounds the logits); choose one of them")
        self.probe = AttentionLogits.of(model)
        self.reader = self.probe.want(lambda: self.measuring)
        return model

    def on_gradients(self, model: torch.nn.Module) -> None:
        """The step's forward passes are over (a replay measures again and replaces it): keep its maxima."""
        self._step_max = self.probe.close(self.reader) if self.measuring else None
        if self._step_max is not None and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self._step_max, op=dist.ReduceOp.MAX)  # every rank reaches this hook alike

    @torch.no_grad()
    def on_update(self, model: torch.nn.Module) -> None:
        measured, self._step_max = self._step_max, None
        self.updates += 1
        if measured is None:
            return
        self._log_max = measured if self._log_max is None else torch.maximum(self._log_max, measured)
        for attention, peak in zip(self.attentions, measured):
            q_scale, k_scale, clipped = qk_clip_scales(peak, attention.n_kv_heads, self.tau, self.alpha)
            scale_rows_(attention.wq.weight, q_scale, attention.head_dim)
            scale_rows_(attention.wk.weight, k_scale, attention.head_dim)
            self._clipped = self._clipped.to(clipped.device) + clipped.sum()

    def metrics(self) -> dict[str, float]:
        out = {"stab/qk_clip/clipped_heads": int(self._clipped.item())}  # host syncs, at logging time only
        if self._log_max is not None:
            per_layer = self._log_max.amax(dim=1).tolist()
            out["stab/qk_clip/max_logit"] = max(per_layer)
            out.update({f"stab/qk_clip/max_logit/layer_{i}": v for i, v in enumerate(per_layer)})
        self._clipped, self._log_max = torch.zeros_like(self._clipped), None
        return out

    def state_dict(self) -> dict:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state.get("updates", 0)
        self._step_max = None
