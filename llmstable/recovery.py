"""Recovery from spikes: the rollback policy, the ledger that survives rollbacks, and resetting optimizer moments.

The spike guard (llmstable.stabilizers.spike) detects and climbs its ladder; `Rollback` turns its actions into
plans and keeps the books. It decides, the trainer executes:
- after each step, which saved checkpoints have been followed by enough clean steps to become *good*;
- on a rollback, a `Plan`: the good checkpoint to return to, the sample ordinals to skip, the LR factor, and
  whether to zero the optimizer moments; or an abort when there is nothing to return to, or too many rollbacks.
The trainer carries a plan out through the same `restore` that resume uses, so a rollback is a resume plus a
data skip. The checkpoint brings back the model, the optimizer, the data position, the RNGs and the detector; the
ledger is what must *not* go back in time: the counters, the data skip list and the LR scale (which faults have
fired is kept by the fault injector, llmstable.faults).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from llmstable.config import SpikeGuardConfig
from llmstable.ranges import add_range
from llmstable.stabilizers.ladder import SpikeLadder


@dataclass
class Ledger:
    spikes: int = 0
    rollbacks: int = 0
    skipped_steps: int = 0
    skipped_samples: int = 0
    lr_cuts: int = 0
    moment_resets: int = 0
    lr_scale: float = 1.0
    skip_ranges: list = field(default_factory=list)  # [[start, end), ...] of sample ordinals

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict | None) -> Ledger:
        """(Checkpoints written before faults kept their own record carry `faults_fired` here: it is dropped.)"""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (state or {}).items() if k in known})


@dataclass
class Target:
    """A good checkpoint to return to, and the data position saved in it."""

    path: Path
    step: int
    ordinal: int


@dataclass
class Plan:
    """What the trainer must do after a spike that the guard would not just skip."""

    kind: str  # rollback | abort
    target: Target | None = None
    skip: tuple[int, int] = (0, 0)  # [start, end) sample ordinals never to serve again
    lr_factor: float = 1.0  # multiplies the ledger's LR scale
    reset_moments: bool = False


class Rollback:
    """The rollback policy of the spike guard (`stabilizer.spike_guard`); with no guard, every checkpoint is good
    at once and no plan is ever made."""

    def __init__(self, cfg: SpikeGuardConfig | None, global_batch_size: int):
        self.cfg, self.global_batch_size = cfg, global_batch_size
        self.ladder = SpikeLadder(cfg) if cfg is not None else None  # what each rung does (its one owner)
        self.ledger = Ledger()
        self.pending_good: list[int] = []  # checkpoint steps waiting for enough clean steps to become good

    @property
    def guarded(self) -> bool:
        return self.cfg is not None

    def saved(self, step: int, good: bool) -> None:
        """Checkpoint `step` was written (`good`: already marked good, as the initial weights are)."""
        if self.guarded and not good:
            self.pending_good.append(step)

    def step_done(self, step: int, skipped: bool) -> list[int]:
        """After optimizer step `step` (counted): the checkpoints that became good with it. A skipped update
        counts as a spike, and what was saved just before it is not a safe place to return to."""
        if skipped:
            self.ledger.spikes += 1
            self.ledger.skipped_steps += 1
            self.pending_good.clear()
            return []
        ready = [s for s in self.pending_good if self.ladder.good(s, step)] if self.guarded else []
        self.pending_good = [s for s in self.pending_good if s not in ready]
        return ready

    def plan(self, action, consumed_until: int, target: Target | None) -> Plan:
        """The plan for a rollback or abort `action` of the guard, given the samples consumed so far (the loader's
        ordinal) and the newest good checkpoint. Counts the spike."""
        self.ledger.spikes += 1
        if action.kind == "abort" or target is None:
            return Plan("abort", target)
        return Plan("rollback", target, self.ladder.skip_range(target.ordinal, consumed_until, self.global_batch_size),
                    self.ladder.lr_factor(action.lr_cut), action.moment_reset)

    def carried_out(self, plan: Plan) -> None:
        """Book a rollback the trainer has carried out (after its restore)."""
        ledger = self.ledger
        start, end = plan.skip
        ledger.skip_ranges = add_range(ledger.skip_ranges, start, end)
        ledger.rollbacks += 1
        ledger.skipped_samples += end - start
        if plan.lr_factor != 1.0:
            ledger.lr_scale *= plan.lr_factor
            ledger.lr_cuts += 1
        if plan.reset_moments:
            ledger.moment_resets += 1
        self.pending_good.clear()

    def metrics(self) -> dict[str, float]:
        """The spike counters for a metrics row (none without a guard)."""
        if not self.guarded:
            return {}
        ledger = self.ledger
        return {"stab/spike/spikes": ledger.spikes, "stab/spike/rollbacks": ledger.rollbacks,
                "stab/spike/skipped_steps": ledger.skipped_steps}

    def state_dict(self) -> dict:
        return {"ledger": self.ledger.state_dict(), "pending_good": list(self.pending_good)}

    def load_state_dict(self, state: dict, keep_ledger: bool = False) -> None:
        """Resume: everything from the checkpoint. Rollback (keep_ledger): only the pending checkpoints."""
        if not keep_ledger:
            self.ledger = Ledger.from_state(state.get("ledger"))
        self.pending_good = list(state.get("pending_good", []))


def zero_moments(optimizer: torch.optim.Optimizer, moment_keys: tuple[str, ...]) -> int:
    """Zero the moment tensors the optimizer declares (`optimizer.moment_keys` of its config: Adam's first and
    second moments, Muon's momentum buffer, S3's p-th moment, Adam-mini's block means, ...); step counts stay, as
    SPAM's own resets keep them. Returns the number of tensors zeroed."""
    count = 0
    for state in optimizer.state.values():
        for key in moment_keys:
            if isinstance(state.get(key), torch.Tensor):
                state[key].zero_()
                count += 1
    return count
