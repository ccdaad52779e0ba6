"""Spike guard: detect loss and gradient-norm spikes, then climb an escalation ladder: skip the update, roll back
to the last good checkpoint and skip the data since, cut the LR, reset the optimizer moments, and finally abort.

This automates the manual procedure of PaLM (Chowdhery et al. 2022, arXiv 2204.02311, section 5.1: restart from a
checkpoint about 100 steps before the spike and skip 200 to 500 batches), GLM-130B (arXiv 2210.02414), OPT
(arXiv 2205.01068, lowering the LR on restart) and K2 (arXiv 2501.07124).

Detection (`SpikeDetector`, a dataclass: public fields are hyperparameters, private fields are checkpointed
state, so the detector is warm after a resume) flags a value when any rule fires:
- non-finite: NaN or Inf, at once, even before any history;
- window: value > mean + k_std * std over the last `window` clean values, once `min_history` values are in
  (std is floored at 0.1% of |mean|, so a flat stream does not flag every tiny rise);
- EMA ratio: value > ema_ratio * EMA of the clean values, once `min_history` values are in.
Spiky values never enter the history. Every rank sees the same (already reduced) values, so every rank decides
the same.

`SpikeGuard` turns detections into actions; the trainer carries them out (hooks never touch the trainer).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from llmstable.config import SpikeGuardConfig
from llmstable.stabilizers.hooks import Action, Capabilities, Detection, Stabilizer

__all__ = ["Action", "Detection", "SpikeDetector", "SpikeGuard"]


@dataclass
class SpikeDetector:
    """Rolling mean + k_std * std and EMA-ratio rules over one metric (OLMo-core's defaults: k 6, window 128; the
    values live in SpikeGuardConfig, the one source of the guard's defaults)."""

    window: int = SpikeGuardConfig.window
    k_std: float = SpikeGuardConfig.k_std
    min_history: int = SpikeGuardConfig.min_history
    ema_decay: float = SpikeGuardConfig.ema_decay
    ema_ratio: float = SpikeGuardConfig.ema_ratio
    _history: deque = field(default_factory=deque, repr=False)
    _ema: float | None = field(default=None, repr=False)

    def check(self, value: float) -> tuple[str, float] | None:
        """(rule, threshold) if value is a spike, else None. Pure: does not record the value."""
        if not math.isfinite(value):
            return "non_finite", math.inf
        if len(self._history) < self.min_history:
            return None
        n = len(self._history)
        mean = sum(self._history) / n
        std = max(math.sqrt(sum((x - mean) ** 2 for x in self._history) / max(n - 1, 1)), 1e-3 * abs(mean))
        limit = mean + self.k_std * std
        if value > limit:
            return "window", limit
        if self._ema is not None and value > self.ema_ratio * self._ema:
            return "ema_ratio", self.ema_ratio * self._ema
        return None

    def record(self, value: float) -> None:
        """Add a clean value to the history and the EMA."""
        self._history.append(value)
        while len(self._history) > self.window:
            self._history.popleft()
        self._ema = value if self._ema is None else self.ema_decay * self._ema + (1 - self.ema_decay) * value

    def state_dict(self) -> dict:
        return {"history": list(self._history), "ema": self._ema}

    def load_state_dict(self, state: dict) -> None:
        self._history = deque(state["history"])
        self._ema = state["ema"]


class SpikeGuard(Stabilizer):
    """Hook `check_step(step, values)`: fires once per optimizer step, on every rank, after backward and the
    gradient-norm reduction and before the optimizer step, with the step's loss and pre-clip gradient norm as
    host floats (the one sync the trainer does per step). Returns None or an `Action`.

    The ladder: the first `skip_steps` spiky steps in a row are skipped (no update); the next one rolls back. The
    `lr_cut_after`-th rollback and later ones also multiply the LR by `lr_cut_factor`; the `moment_reset_after`-th
    and later ones also zero the optimizer moments. Past `max_rollbacks` rollbacks the guard asks to abort.
    """

    name = "spike"

    def __init__(self, cfg, capabilities: Capabilities = Capabilities()):
        self.cfg = cfg
        self.detectors = {
            metric: SpikeDetector(cfg.window, cfg.k_std, cfg.min_history, cfg.ema_decay, cfg.ema_ratio)
            for metric in cfg.metrics
        }
        self._spiky_in_a_row = 0
        # False under DeepSpeed, which has updated before the guard sees the step: it rolls back instead
        self.can_skip = capabilities.can_skip

    def check_step(self, step: int, values: dict[str, float], rollbacks_so_far: int) -> Action | None:
        detections = []
        for metric, detector in self.detectors.items():
            found = detector.check(values[metric])
            if found is not None:
                detections.append(Detection(metric, values[metric], found[1], found[0]))
        if not detections:
            for metric, detector in self.detectors.items():
                detector.record(values[metric])
            self._spiky_in_a_row = 0
            return None
        self._spiky_in_a_row += 1
        if self.can_skip and self._spiky_in_a_row <= self.cfg.skip_steps:
            return Action("skip_step", detections)
        n = rollbacks_so_far + 1  # from the trainer's ledger, which survives the rollback itself
        if n > self.cfg.max_rollbacks:
            return Action("abort", detections)
        return Action("rollback", detections,
                      lr_cut=self.cfg.lr_cut_after > 0 and n >= self.cfg.lr_cut_after,
                      moment_reset=self.cfg.moment_reset_after > 0 and n >= self.cfg.moment_reset_after)

    def state_dict(self) -> dict:
        return {"detectors": {m: d.state_dict() for m, d in self.detectors.items()},
                "spiky_in_a_row": self._spiky_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        for metric, detector in self.detectors.items():
            if metric in state.get("detectors", {}):
                detector.load_state_dict(state["detectors"][metric])
        self._spiky_in_a_row = state.get("spiky_in_a_row", 0)
