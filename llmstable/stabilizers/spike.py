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
from llmstable.stabilizers.hooks import Action, Capabilities, Detection, Stabilizer, SuspectedHardwareFault
from llmstable.stabilizers.ladder import SpikeLadder
from llmstable.stabilizers.localize import SpikeLocalizer
from llmstable.stabilizers.sdc import SDCReplay
from llmstable.stabilizers.warning import PrecondWarning

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

    The ladder (llmstable.stabilizers.ladder, which owns its rules): the first `skip_steps` spiky steps in a row are
    skipped (no update); the next one rolls back. The `lr_cut_after`-th rollback and later ones also multiply the
    LR by `lr_cut_factor`; the `moment_reset_after`-th and later ones also zero the optimizer moments. Past
    `max_rollbacks` rollbacks the guard asks to abort.

    Around the ladder (each in its own module): every spike names the block it came from
    (`localize.SpikeLocalizer`, via `on_gradients`); with `replay`, a spike is first recomputed to tell a hardware
    fault from a real spike (`sdc.SDCReplay`, via `Action("replay")` / `on_replay`); with `precond` or
    `precond_curvature` watched, Adam's preconditioner gives early warnings (`warning.PrecondWarning`, via
    `begin_step`, `on_loss`, `on_gradients`, `lr_factor`). Warnings and SDC suspects go out through `events`.
    """

    name = "spike"

    def __init__(self, cfg, capabilities: Capabilities = Capabilities()):
        self.cfg, self.ladder = cfg, SpikeLadder(cfg)
        self.detectors = {
            metric: SpikeDetector(cfg.window, cfg.k_std, cfg.min_history, cfg.ema_decay, cfg.ema_ratio)
            for metric in cfg.spike_metrics()
        }
        self._spiky_in_a_row = 0
        # False under DeepSpeed, which has updated before the guard sees the step: it rolls back instead
        self.can_skip = capabilities.can_skip
        self.replays = cfg.replay and capabilities.can_replay
        self.localizer = SpikeLocalizer(k_std=cfg.k_std)
        self.sdc = SDCReplay(cfg.max_sdc)
        watch = set(cfg.watch)
        self.warning = (PrecondWarning(cfg, "precond" in watch, "precond_curvature" in watch)
                        if watch & {"precond", "precond_curvature"} else None)
        self._logged = False
        self._events: list[tuple[str, int, dict]] = []
        self._step, self._rollbacks = 0, 0  # of the step being checked (for on_replay and on_update)
        self._last_layer: int | None = None  # the block of the latest spike, for the next metrics row

    # --- the hooks ---------------------------------------------------------------------------------------------

    def bind_optimizer(self, optimizer) -> None:
        if self.warning is not None:
            self.warning.optimizer = optimizer

    def begin_step(self, step: int, logged: bool) -> None:
        self._logged = logged
        if self.warning is not None:
            self.warning.begin_step(step, logged)

    def on_loss(self, logits, loss):
        if self.warning is not None:
            self.warning.on_loss(loss)
        return loss

    def on_gradients(self, model) -> None:
        self.localizer.measure(model)  # device-side: no host sync
        if self.warning is not None:
            self.warning.on_gradients(model)
        if self._logged:
            self.localizer.before_update(model)  # per-block update norms, at logged steps only

    def check_step(self, step: int, values: dict[str, float], rollbacks_so_far: int) -> Action | None:
        self._step, self._rollbacks = step, rollbacks_so_far
        if self.warning is not None and (fields := self.warning.check(step)) is not None:
            self._events.append(("spike_warning", step, fields))
        detections = self.detect(values)
        if not detections:
            self.record(values)
            return None
        if self.replays and self.sdc.replaying != step:
            self.sdc.replaying = step
            return Action("replay", detections)
        return self.climb(step, detections, rollbacks_so_far)

    def on_replay(self, step: int, first: dict[str, float], replayed: dict[str, float]) -> Action | None:
        try:
            suspect = self.sdc.compare(step, first, replayed)
        except SuspectedHardwareFault:
            self._events.append(("sdc_suspect", step, {"first": first, "replayed": replayed,
                                                       "suspects": self.sdc.suspects, "action": "stop"}))
            raise
        if suspect is None:  # reproduced bit for bit: a real spike, the ladder goes on
            return self.climb(step, self.detect(replayed), self._rollbacks)
        self._events.append(("sdc_suspect", step, {**suspect, "action": "continue"}))
        if not self.detect(replayed):
            self.record(replayed)
        return None  # carry on with the replayed result; no data is skipped

    def on_update(self, model) -> None:
        self.localizer.after_update(self._step, model)

    def lr_factor(self, step: int) -> float:
        return self.warning.lr_factor(step) if self.warning is not None else 1.0

    def events(self) -> list[tuple[str, int, dict]]:
        out, self._events = self._events, []
        return out

    def metrics(self) -> dict[str, float]:
        out = {"stab/spike/sdc_suspects": self.sdc.suspects} if self.cfg.replay else {}
        if self._last_layer is not None:
            out["stab/spike/layer"], self._last_layer = self._last_layer, None
        return {**out, **(self.warning.metrics() if self.warning is not None else {})}

    # --- detection and the ladder ----------------------------------------------------------------------------

    def detect(self, values: dict[str, float]) -> list[Detection]:
        detections = []
        for metric, detector in self.detectors.items():
            found = detector.check(values[metric])
            if found is not None:
                detections.append(Detection(metric, values[metric], found[1], found[0]))
        return detections

    def record(self, values: dict[str, float]) -> None:
        for metric, detector in self.detectors.items():
            detector.record(values[metric])
        self._spiky_in_a_row = 0
        self.localizer.commit()

    def climb(self, step: int, detections: list[Detection], rollbacks_so_far: int) -> Action | None:
        """The ladder's next rung for a spiky step; each detection names its block (one host sync, now)."""
        if not detections:  # (a replay that reproduced bit for bit reproduces the detection too)
            return None
        where = self.localizer.attribute(step)
        for d in detections:
            d.details = where
        self._last_layer = where.get("layer")
        self._spiky_in_a_row += 1
        # rollbacks_so_far: from the trainer's ledger, which survives the rollback itself
        rung = self.ladder.rung(self._spiky_in_a_row, rollbacks_so_far, self.can_skip)
        return Action(rung.kind, detections, lr_cut=rung.lr_cut, moment_reset=rung.moment_reset)

    def state_dict(self) -> dict:
        return {"detectors": {m: d.state_dict() for m, d in self.detectors.items()},
                "spiky_in_a_row": self._spiky_in_a_row, "localizer": self.localizer.state_dict(),
                "sdc": self.sdc.state_dict(),
                **({"warning": self.warning.state_dict()} if self.warning is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        for metric, detector in self.detectors.items():
            if metric in state.get("detectors", {}):
                detector.load_state_dict(state["detectors"][metric])
        self._spiky_in_a_row = state.get("spiky_in_a_row", 0)
        self.localizer.load_state_dict(state.get("localizer", {}))
        self.sdc.load_state_dict(state.get("sdc", {}))
        if self.warning is not None:
            self.warning.load_state_dict(state.get("warning", {}))
