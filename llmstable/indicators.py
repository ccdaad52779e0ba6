"""Leading indicators of instability, measured at logged steps only (they cost host syncs and a copy of the
weights): the largest per-block gradient norm and which block it is, and the norm of the update the optimizer
applied. Update-norm spikes come before loss spikes and are larger in lower layers (marin#1368). And the logits'
indicators of Wortsman et al. 2023 (arXiv 2309.14322): the largest attention logit (attention-logit growth, which
QK-norm cures) and the output softmax's log Z and largest logit (output-logit divergence, which z-loss cures).

Under FSDP2 the gradients and weights are DTensor shards: the per-block norms (llmstable.parallel.dtensors'
`block_norms`) take one collective for all blocks together, which every rank reaches alike.
"""

from __future__ import annotations

import math
import weakref

import torch

from llmstable.model.llama import apply_rope
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


# --- the logits' indicators -------------------------------------------------------------------------------------

CHUNK_LOGITS = 2**24  # attention logits computed at a time when taking their maximum


def max_attention_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The largest causal pre-softmax logit of each query head: q (B, H, T, hd) and k (B, Hkv, T, hd), RoPE
    applied, -> (H,) fp32. Key heads are shared by consecutive query heads, as SDPA's enable_gqa does."""
    B, H, T, hd = q.shape
    if k.shape[1] != H:
        k = k.repeat_interleave(H // k.shape[1], dim=1)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    out = torch.full((H,), -math.inf, device=q.device)
    rows = max(1, CHUNK_LOGITS // (H * T * T))
    for b in range(0, B, rows):
        logits = (q[b:b + rows].float() @ k[b:b + rows].float().transpose(-1, -2)) / math.sqrt(hd)  # (b, H, T, T)
        out = torch.maximum(out, logits.masked_fill(future, -math.inf).amax(dim=(0, 2, 3)))
    return out


_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its AttentionLogits


class AttentionLogits:
    """The largest causal pre-softmax attention logit, q_i . k_j / sqrt(head_dim) with RoPE applied and j <= i, of
    every layer and head, over the training forward passes of the steps its users want measured (attention-logit
    growth: Dehghani et al. 2023, arXiv 2302.05442; Wortsman et al. 2023, arXiv 2309.14322).

    SDPA never exposes its logits, so they are computed apart: forward hooks keep the outputs of each layer's `wq`
    and `wk` (no copy), and the attention module's hook applies RoPE and takes the causal max of q k^T in fp32, in
    chunks of the batch (`max_attention_logits`): one extra q k^T per layer in a measured forward pass. Hooks, not a
    change to the model, so the model file stays plain and compiled, DDP and FSDP2 models carry them alike.

    One instance per model (`of`), shared by QK-clip (which rescales W_q and W_k with it) and the logged steps'
    indicators (which report it): a step both want is measured once. Each user says when it wants a measurement with
    `want(predicate)` (read in every forward pass) and gets back its reader number for `close(reader)`, which ends a
    step's measurement; evaluation forwards (eval mode) are never measured. Values are this rank's share of the
    batch; the users reduce across ranks (max)."""

    def __init__(self, model: torch.nn.Module):
        self.attentions = [layer.attention for layer in model.layers]
        self._wanted: list = []  # callables, one per reader; a forward pass is measured when any returns True
        self._captured: dict[int, dict[str, torch.Tensor]] = {}
        self._running: torch.Tensor | None = None  # (layers, heads) maxima of the forward passes since the last close
        self._last: torch.Tensor | None = None  # what the last close ended
        self._closed = 0  # measurements ended so far
        self._seen: dict[int, int] = {}  # reader -> the measurement it last received
        for i, attention in enumerate(self.attentions):
            attention.wq.register_forward_hook(self._capture(i, "q"))
            attention.wk.register_forward_hook(self._capture(i, "k"))
            attention.register_forward_hook(self._measure(i))

    @classmethod
    def of(cls, model: torch.nn.Module) -> AttentionLogits:
        """The model's instance, made (and its hooks registered) on first use."""
        if model not in _PROBES:
            _PROBES[model] = cls(model)
        return _PROBES[model]

    def want(self, predicate) -> int:
        """Measure every training forward pass during which predicate() is true; returns the reader for `close`."""
        self._wanted.append(predicate)
        return len(self._wanted) - 1

    @property
    def measuring(self) -> bool:
        return any(wanted() for wanted in self._wanted)

    def close(self, reader: int) -> torch.Tensor | None:
        """The (layers, heads) maxima of the forward passes measured since the last close, on this rank; the same
        tensor to every reader that closes with no forward pass in between (so QK-clip and the indicators share a
        step's measurement), and None to a reader that has received it already (nothing measured since)."""
        if self._running is not None:
            self._last, self._running = self._running, None
            self._closed += 1
        if self._last is None or self._seen.get(reader) == self._closed:
            return None
        self._seen[reader] = self._closed
        return self._last

    def _capture(self, layer: int, which: str):
        def hook(module, args, output):
            if module.training and self.measuring:
                self._captured.setdefault(layer, {})[which] = output.detach()
        return hook

    def _measure(self, layer: int):
        @torch.no_grad()
        def hook(module, args, output):
            captured = self._captured.pop(layer, None)
            if captured is None or len(captured) < 2:
                return
            x, cos, sin = args
            B, T, _ = x.shape
            q = captured["q"].view(B, T, module.n_heads, module.head_dim)  # (B, T, H, hd)
            k = captured["k"].view(B, T, module.n_kv_heads, module.head_dim)  # (B, T, Hkv, hd)
            if module.q_norm is not None:  # QK-norm acts before RoPE, as in the attention itself
                q, k = module.q_norm(q), module.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, hd), (B, Hkv, T, hd)
            peak = max_attention_logits(apply_rope(q, cos, sin), apply_rope(k, cos, sin))
            if self._running is None or self._running.device != peak.device:  # the first measured pass of a step
                self._running = torch.full((len(self.attentions), peak.numel()), -math.inf, device=peak.device)
            self._running[layer] = torch.maximum(self._running[layer], peak)
        return hook


class LogitIndicators:
    """The logits' indicators of a logged step (Wortsman et al. 2023, arXiv 2309.14322, sections 3.1.1 and 3.1.2),
    over the step's training forward passes:
    - `stab/attn_logit_max`: the largest attention logit over layers and heads (`AttentionLogits`), with
      `stab/attn_logit_max/layer` (the layer it is in) and `stab/attn_logit_max/layer_<i>` (each layer's largest);
    - `stab/output_log_z`: the mean over tokens of log Z = logsumexp of the output logits (z-loss pulls it to 0;
      output-logit divergence drives it far from 0); `stab/output_logit_max`: the largest output logit.

    The step (llmstable.step) calls `begin(logged)` before the forward passes, `add_output(logits)` on each
    micro-batch's logits, and `values(world)` after them at logged steps: only logged steps are measured, so the
    cost is one extra q k^T per layer and one logsumexp over the logits every `train.log_interval` steps."""

    def __init__(self, model: torch.nn.Module):
        self.attention = AttentionLogits.of(model)
        self.reader = self.attention.want(lambda: self.active)
        self.active = False
        self.restart()

    def begin(self, logged: bool) -> None:
        """Before the step's forward passes: measure them if the step is logged."""
        self.active = logged
        self.restart()

    def restart(self) -> None:
        """Forget the output statistics gathered so far (a new step, or the replay of one)."""
        self._log_z_sum: torch.Tensor | None = None
        self._tokens = 0
        self._logit_max: torch.Tensor | None = None

    @torch.no_grad()
    def add_output(self, logits: torch.Tensor) -> None:
        """One micro-batch's output logits (..., V): sums stay on the device (no host sync)."""
        if not self.active:
            return
        logits = logits.detach().float()
        log_z = torch.logsumexp(logits, dim=-1)  # (B, T)
        peak = logits.amax()
        self._log_z_sum = log_z.sum() if self._log_z_sum is None else self._log_z_sum + log_z.sum()
        self._logit_max = peak if self._logit_max is None else torch.maximum(self._logit_max, peak)
        self._tokens += log_z.numel()

    def values(self, world) -> dict[str, float]:
        """The step's indicators, as the mean over ranks (log Z; every rank holds as many tokens) and the maxima over
        ranks (collectives every rank reaches alike: the logged steps are the same on every rank); one host sync."""
        self.active = False
        if self._log_z_sum is None:
            return {}
        per_layer = self.attention.close(self.reader)  # (layers, heads) on this rank, or None
        per_layer = per_layer.amax(dim=1) if per_layer is not None else self._logit_max.new_empty(0)
        peaks = world.max(torch.cat([self._logit_max.view(1), per_layer]))
        log_z = world.mean(self._log_z_sum / self._tokens)
        out = torch.cat([log_z.view(1), peaks]).tolist()  # host sync, logged steps only
        values = {"stab/output_log_z": out[0], "stab/output_logit_max": out[1]}
        layers = out[2:]
        if layers:
            top = max(range(len(layers)), key=layers.__getitem__)
            values.update({"stab/attn_logit_max": layers[top], "stab/attn_logit_max/layer": top})
            values.update({f"stab/attn_logit_max/layer_{i}": v for i, v in enumerate(layers)})
        return values
