"""Per-layer spike localisation: which transformer block a spike came from, and which block moved first.

Update-norm spikes come before loss spikes and are larger in lower layers (marin#1368), so a spike event is more
useful when it says where. `SpikeLocalizer` keeps, on the device, the gradient norm of every block at every step
(one stacked norm per block, no host sync; under FSDP2 one all-reduce for all blocks, `parallel.dtensors.block_norms`) and
the last `window` clean steps of them. Only when the guard has detected a spike does it read them back (the extra
host sync happens after detection, never on a clean step) and name:
- `layer`: the block that moved first relative to its own history: for each block, the first of the last
  `recent` steps (the spike step included) where its norm exceeded mean + k_std * std of its own earlier history;
  the earliest wins, ties go to the larger excess; with no crossing (or too little history), the block with the
  largest ratio to its own mean;
- `layer_moved_at`: the step that block first crossed at;
- `layer_grad_norms` (this step, per block) and `layer_grad_ratios` (over each block's history mean);
- `layer_update_norms` and `layer_update_step`: the per-block norms of the last update that was measured (at logged
  steps, where the weights before the update are copied anyway for `optim/update_norm`); a spiky step's own update
  is never applied, so it has none.
"""

from __future__ import annotations

from collections import deque

import torch

from llmstable.indicators import layer_grad_norms
from llmstable.parallel.dtensors import block_norms

MIN_BASELINE = 8  # clean steps of history a block's mean and std are taken over, before the recent ones


def block_update_norms(model: torch.nn.Module, before: list[list[torch.Tensor]]) -> torch.Tensor:
    """The norm of each block's weight change since `before` (one list of tensors per block), on the device."""
    return block_norms([[p.detach() - b for p, b in zip(layer.parameters(), old)]
                        for layer, old in zip(model.layers, before)])


def first_mover(history: torch.Tensor, recent: torch.Tensor, k_std: float) -> tuple[int, int, torch.Tensor]:
    """(block, index into `recent` where it first crossed, ratios of the last row) from per-block norms.

    history: (H, L) clean steps before the recent ones; recent: (R, L), the spike step last. A block crosses when
    its norm exceeds mean + k_std * std of its own history (std floored at 5% of the mean, so a block must move by
    a third at the default k_std of 6)."""
    last = recent[-1]
    if history.shape[0] >= 2:
        mean, std = history.mean(0), history.std(0)
        std = torch.maximum(std, 0.05 * mean.abs())
        excess = (recent - mean) / std  # (R, L) in standard deviations of each block's own history
        crossed = excess > k_std
        if bool(crossed.any()):
            first = torch.where(crossed.any(0), crossed.float().argmax(0), torch.full_like(last, 10**9).long())
            earliest = int(first.min())
            candidates = (first == earliest).nonzero().flatten()
            block = int(candidates[excess[earliest, candidates].argmax()])
            return block, earliest, last / mean.clamp_min(1e-30)
        ratios = last / mean.clamp_min(1e-30)
        return int(ratios.argmax()), recent.shape[0] - 1, ratios
    return int(last.argmax()), recent.shape[0] - 1, torch.ones_like(last)


class SpikeLocalizer:
    """Per-block gradient norms each step (device-side), attributed to a block when a spike is detected.

    The guard calls `measure(model)` from `on_gradients`, `commit()` for a clean step, `attribute(step)` for a
    spiky one; `before_update` / `after_update` at logged steps measure the per-block update."""

    def __init__(self, window: int = 64, recent: int = 8, k_std: float = 6.0):
        self.window, self.recent, self.k_std = window, recent, k_std
        self._current: torch.Tensor | None = None  # this step's per-block norms (device)
        self._history: deque = deque(maxlen=window)  # device tensors (L,), clean steps, oldest first
        self._before: list | None = None
        self._update: tuple[int, list[float]] | None = None  # (step, per-block update norms) of the last measured

    def measure(self, model: torch.nn.Module) -> None:
        self._current = layer_grad_norms(model).float()  # device tensor: no host sync
        self._before = None  # (a copy from a step whose update was skipped is stale)

    def commit(self) -> None:
        """The step was clean: its norms join the history."""
        if self._current is not None:
            self._history.append(self._current.detach())
        self._current = None

    def attribute(self, step: int) -> dict:
        """The spike event's per-layer fields (host sync: only after a detection)."""
        if self._current is None:
            return {}
        rows = [h.to(self._current.device) for h in self._history]
        # the last recent - 1 clean steps are candidates for "moved first" when enough history is left before them
        split = len(rows) - (self.recent - 1) if len(rows) >= self.recent - 1 + MIN_BASELINE else len(rows)
        history = torch.stack(rows[:split]) if split else self._current.new_zeros((0, self._current.numel()))
        recent = torch.stack([*rows[split:], self._current])
        block, index, ratios = first_mover(history, recent, self.k_std)
        out = {"layer": block, "layer_moved_at": step - (recent.shape[0] - 1 - index),
               "layer_grad_norms": [round(v, 6) for v in self._current.tolist()],
               "layer_grad_ratios": [round(v, 3) for v in ratios.tolist()]}
        if self._update is not None:
            out["layer_update_step"], out["layer_update_norms"] = self._update
        return out

    def before_update(self, model: torch.nn.Module) -> None:
        self._before = [[p.detach().clone() for p in layer.parameters()] for layer in model.layers]

    def after_update(self, step: int, model: torch.nn.Module) -> None:
        if self._before is not None:
            norms = block_update_norms(model, self._before).tolist()  # host sync, at logged steps only
            self._update = (step, [round(v, 8) for v in norms])
            self._before = None

    def state_dict(self) -> dict:
        return {"history": [h.tolist() for h in self._history], "update": self._update}

    def load_state_dict(self, state: dict) -> None:
        device = self._current.device if self._current is not None else "cpu"
        self._history = deque((torch.tensor(h, dtype=torch.float32, device=device) for h in state.get("history", [])),
                              maxlen=self.window)
        self._update = tuple(state["update"]) if state.get("update") else None
        self._current = None
