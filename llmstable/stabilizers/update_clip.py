"""Update clipping: each tensor's update RMS is held to at most k times its own running mean.

Anchors. Adam's update-norm spikes come before its loss spikes, and are larger in the lower layers (marin#1368).
Levanter clips the update in two ways: `clip_update_norm` holds the global update norm against the mean and
standard deviation of a rolling window of past norms (Marin's 32B runs use a window of 128 steps), and
`update_rms_clipping` caps the RMS of Adam's normalized update at a constant (levanter PR 982). This stabilizer
combines the two ideas at the granularity of one tensor: the update u = w_after - w_before that the optimizer
applied, whatever the optimizer, is measured by its RMS r = ||u|| / sqrt(numel) and compared with the mean m of
the last `window` RMS values of that same tensor. If r > k m, the update is scaled by k m / r, so the tensor moves
exactly k m in RMS. Per tensor, because the update of a quiet layer should not be allowed to hide behind a large
one (and marin#1368 sees the spikes per layer).

Choices the anchors leave open, and ours:
- the history holds the RMS actually applied (after clipping), so a spike never raises its own threshold; this is
  the convention of Fira's norm-growth limiter as well;
- nothing is clipped until `min_history` updates are in the window (the first steps of Adam are large by design);
- weight decay is part of the update (it is part of what the optimizer did to the weights);
- a clipped update is applied as w_after - (1 - s) u, which equals w_after bit for bit when s = 1, so a run in
  which nothing is clipped is bitwise the run without this stabilizer.

Hooks: `before_update(model)` keeps a copy of the weights (the one extra memory cost: one copy of the parameters,
held only during the step); `on_update(model)` measures and clips. No host sync: the window lives on the device.
Under FSDP2 each norm is reduced across the shards (DTensor), so every rank clips alike.
"""

from __future__ import annotations

import math

import torch

from llmstable.parallel.dtensors import full, replicated_like
from llmstable.stabilizers.hooks import Stabilizer


def update_clip_scale(rms: torch.Tensor, history_mean: torch.Tensor, k: float,
                      active: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The factor s that holds an update of RMS `rms` to k times `history_mean`, and whether it clipped.
    s is exactly 1.0 when it does not clip (or before the history is long enough: active False)."""
    limit = k * history_mean
    clipped = (rms > limit) & active
    return torch.where(clipped, limit / rms, torch.ones_like(rms)), clipped


class UpdateClip(Stabilizer):
    """Hooks `before_update` / `on_update`, every applied optimizer step (see the module docstring).

    Metrics at logging time: `stab/update_clip/clipped` (tensors clipped since the last row) and
    `stab/update_clip/max_ratio` (the largest r / m seen since the last row, once the window is active).
    `state_dict()` holds the windows (floats, by parameter name) and the update count, so resume is exact."""

    name = "update_clip"

    def __init__(self, k: float = 2.0, window: int = 128, min_history: int = 16):
        if not k > 1.0:
            raise ValueError(f"k={k} must be > 1 (a multiple of the running mean update RMS)")
        if window <= 0 or not 0 < min_history <= window:
            raise ValueError(f"window={window} and min_history={min_history}: need 0 < min_history <= window")
        self.k, self.window, self.min_history = k, window, min_history
        self.updates = 0  # applied updates seen (host integer: the window index needs no sync)
        self.history: dict[str, torch.Tensor] = {}  # name -> (window,) RMS values, a ring buffer
        self.before: list[tuple[str, torch.nn.Parameter, torch.Tensor]] = []
        self._clipped = torch.zeros((), dtype=torch.int64)
        self._max_ratio = torch.zeros(())

    @torch.no_grad()
    def before_update(self, model: torch.nn.Module) -> None:
        self.before = [(name, p, p.detach().clone()) for name, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def on_update(self, model: torch.nn.Module) -> None:
        slot, filled = self.updates % self.window, min(self.updates, self.window)
        active = self.updates >= self.min_history
        for name, p, before in self.before:
            delta = p.detach() - before
            rms = full(torch.linalg.vector_norm(delta, dtype=torch.float32)) / math.sqrt(p.numel())
            history = self.history.get(name)
            if history is None:
                history = torch.zeros(self.window, device=rms.device)
            history = self.history[name] = history.to(rms.device)
            mean = history.sum() / max(filled, 1)
            scale, clipped = update_clip_scale(rms, mean, self.k, active)
            if active:
                p.sub_(delta * replicated_like(delta, (1.0 - scale).to(delta.dtype)))  # exactly p when scale == 1
            history[slot] = rms * scale
            self._clipped = self._clipped.to(rms.device) + clipped
            if active:
                self._max_ratio = torch.maximum(self._max_ratio.to(rms.device), rms / mean.clamp_min(1e-30))
        self.before = []
        self.updates += 1

    def metrics(self) -> dict[str, float]:
        out = {"stab/update_clip/clipped": int(self._clipped.item()),  # host syncs, at logging time only
               "stab/update_clip/max_ratio": float(self._max_ratio.item())}
        self._clipped, self._max_ratio = torch.zeros_like(self._clipped), torch.zeros_like(self._max_ratio)
        return out

    def state_dict(self) -> dict:
        return {"updates": self.updates, "history": {name: h.tolist() for name, h in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state.get("updates", 0)
        self.history = {name: torch.tensor(values, dtype=torch.float32)
                        for name, values in state.get("history", {}).items()}
