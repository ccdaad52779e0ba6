"""The spike guard's escalation ladder, in one place: when a spiky step is skipped, when it rolls back, when the LR
is cut and by how much, when the optimizer moments are reset, how much data is skipped, when the guard gives up,
and what it says then. It owns the ladder's keys of `stabilizer.spike_guard`; the detector (llmstable.stabilizers.
spike) asks it which rung a spike reaches, and the rollback policy (llmstable.recovery) asks it what a rung does.

Pure: no state of its own (the counts it reads are the detector's and the ledger's), so it is tested in
milliseconds and the same answers hold on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmstable.config import SpikeGuardConfig


@dataclass(frozen=True)
class Rung:
    kind: str  # skip_step | rollback | abort
    lr_cut: bool = False
    moment_reset: bool = False


class SpikeLadder:
    def __init__(self, cfg: SpikeGuardConfig):
        self.cfg = cfg

    def rung(self, spiky_in_a_row: int, rollbacks_so_far: int, can_skip: bool) -> Rung:
        """The rung of the `spiky_in_a_row`-th spiky step in a row: the first `skip_steps` only skip their update
        (where the engine can skip); then a rollback, which from the `lr_cut_after`-th on also cuts the LR and from
        the `moment_reset_after`-th on also zeroes the moments; past `max_rollbacks` rollbacks, an abort."""
        c = self.cfg
        if can_skip and spiky_in_a_row <= c.skip_steps:
            return Rung("skip_step")
        n = rollbacks_so_far + 1
        if n > c.max_rollbacks:
            return Rung("abort")
        return Rung("rollback", lr_cut=c.lr_cut_after > 0 and n >= c.lr_cut_after,
                    moment_reset=c.moment_reset_after > 0 and n >= c.moment_reset_after)

    def lr_factor(self, lr_cut: bool) -> float:
        """What a rollback multiplies the LR scale by."""
        return self.cfg.lr_cut_factor if lr_cut else 1.0

    def skip_range(self, good_ordinal: int, consumed_until: int, global_batch_size: int) -> tuple[int, int]:
        """The sample ordinals a rollback never serves again: from the good checkpoint's position to what was read
        since, plus `margin_steps` global batches."""
        return good_ordinal, consumed_until + self.cfg.margin_steps * global_batch_size

    def good(self, saved_at: int, now: int) -> bool:
        """Whether a checkpoint saved after step `saved_at` has become good at step `now` (enough clean steps)."""
        return now - saved_at >= self.cfg.good_after_steps

    def abort_message(self, spike_step: int, loss: float, grad_norm: float, rollbacks: int, good) -> str:
        return (f"spike guard: spike at step {spike_step} (loss {loss:.4g}, grad norm {grad_norm:.4g}) after "
                f"{rollbacks} rollbacks (stabilizer.spike_guard.max_rollbacks={self.cfg.max_rollbacks}); the last "
                f"good checkpoint {good} is intact. Lower optimizer.lr, or inspect the data around the skipped "
                "samples in events.jsonl.")
