"""Fault injection (the `fault` config group): for tests, demos, and users rehearsing their recovery plan.

Off by default. Each fault is tied to an optimizer step number (from 1) and fires once per run directory: if a
rollback replays that step, or a rerun of the same command resumes before it, it does not fire again, as a
transient hardware or data fault would not. What has fired is recorded in `RUN_DIR/faults/rank<R>.json` (written
and fsync'd before a fault that ends the process fires), which every rank reads at the start.
"""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import torch

from llmstable.config import FaultConfig


class FaultInjector:
    def __init__(self, cfg: FaultConfig, vocab_size: int, rank: int = 0, run_dir: Path | None = None):
        self.cfg, self.vocab_size, self.rank = cfg, vocab_size, rank
        self.here = cfg.rank is None or cfg.rank == rank  # faults may hit one rank only (not the LR: it is global)
        self.record = run_dir / "faults" / f"rank{rank}.json" if run_dir is not None and cfg.active() else None
        self.fired: set[int] = set()  # steps whose step faults have fired (never rolled back)
        self.events: set[str] = set()  # "kind:step" of the faults that end or interrupt the process
        if self.record is not None:
            for path in sorted(self.record.parent.glob("rank*.json")):  # (every rank's: a fault may hit one)
                try:
                    done = json.loads(path.read_text())
                    self.fired.update(int(s) for s in done.get("steps", []))
                    self.events.update(str(e) for e in done.get("events", []))
                except (OSError, ValueError, TypeError, AttributeError):
                    continue  # (a torn record: the fault fires again, as it would have without one)
        self._sdc_armed = False  # the next forward of block sdc_layer is scaled (set per micro-batch)
        self._sdc_done: int | None = None  # the step the SDC fault hit: a replay of that step runs clean

    def attach(self, model: torch.nn.Module) -> None:
        """Hook the silent-data-corruption fault onto block `sdc_layer` (only when fault.sdc_at_step is set): a
        forward hook that scales that block's output once, as a transient hardware fault would."""
        if self.cfg.sdc_at_step is None or not self.here:
            return

        def corrupt(module, args, output):
            if not self._sdc_armed:
                return None
            self._sdc_armed = False
            return output * self.cfg.sdc_scale

        model.layers[self.cfg.sdc_layer].register_forward_hook(corrupt)

    def _due(self, steps: list, step: int) -> bool:
        return step in steps and step not in self.fired

    def batch(self, step: int, batch: torch.Tensor) -> torch.Tensor:
        """Random tokens instead of the batch at corrupt_batch_steps. Also arms the SDC fault for this micro-batch's
        forward at sdc_at_step: the first forward of that step only, never its replay nor a rolled-back rerun."""
        if self.here and self.cfg.sdc_at_step == step and step not in self.fired and self._sdc_done != step:
            self._sdc_armed, self._sdc_done = True, step
        if not (self.here and self._due(self.cfg.corrupt_batch_steps, step)):
            return batch
        gen = torch.Generator().manual_seed(step)
        return torch.randint(0, self.vocab_size, batch.shape, generator=gen).to(batch.device)

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss (and so the gradients) times loss_scale, or NaN, at their steps."""
        if not self.here:
            return loss
        if self._due(self.cfg.nan_steps, step):
            loss = loss * float("nan")
        if self._due(self.cfg.loss_scale_steps, step):
            loss = loss * self.cfg.loss_scale
        return loss

    def lr(self, step: int, lr: float) -> float:
        return lr * self.cfg.lr_scale if self._due(self.cfg.lr_scale_steps, step) else lr

    def step_done(self, step: int, before_kill=None) -> None:
        """After step `step`: its faults have fired; then SIGKILL, or a preemption signal, if asked (`before_kill`:
        what the process must finish first, e.g. a checkpoint being written, so a test knows what it resumes)."""
        c = self.cfg
        if step in {*c.loss_scale_steps, *c.lr_scale_steps, *c.corrupt_batch_steps, *c.nan_steps, c.sdc_at_step}:
            self.fired.add(step)
            self._save()
        if c.kill_at_step == step and self._first("kill", step) and self.here:
            if before_kill is not None:
                before_kill()
            os.kill(os.getpid(), signal.SIGKILL)
        if c.signal_at_step == step and self._first("signal", step) and self.here:
            os.kill(os.getpid(), getattr(signal, c.signal))  # a real signal, handled as the scheduler's would be

    def in_evaluation(self, step: int, batch: int) -> None:
        """Between evaluation batches (after batch `batch` of the evaluation after step `step`): the preemption
        signal of signal_in_eval_at_step, after the first batch."""
        if batch == 0 and self.cfg.signal_in_eval_at_step == step and self._first("signal_in_eval", step) and self.here:
            os.kill(os.getpid(), getattr(signal, self.cfg.signal))

    def checkpoint_hook(self, step: int):
        """A callback for the middle of writing checkpoint `step` (files written, manifest and rename not yet): a
        SIGKILL, or a full disk (ENOSPC, as the writer would get it). Recorded as fired first, on every rank."""
        if self.cfg.kill_in_checkpoint_at_step == step and self._first("kill_in_checkpoint", step) and self.here:
            return lambda: os.kill(os.getpid(), signal.SIGKILL)
        if self.cfg.disk_full_at_step == step and self._first("disk_full", step) and self.here:
            return lambda: _disk_full(step)
        return None

    def _first(self, kind: str, step: int) -> bool:
        """Whether fault `kind` at `step` has not fired yet in this run directory; records that it fires now."""
        event = f"{kind}:{step}"
        if event in self.events:
            return False
        self.events.add(event)
        self._save()
        return True

    def _save(self) -> None:
        if self.record is None:
            return
        self.record.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.record.with_name(f".{self.record.name}.tmp")
        with open(tmp, "w") as f:
            json.dump({"steps": sorted(self.fired), "events": sorted(self.events)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.record)


def _disk_full(step: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"checkpoint of step {step} (fault.disk_full_at_step)")
