"""Fault injection (the `fault` config group): for tests, demos, and users rehearsing their recovery plan.

Off by default. Each fault is tied to an optimizer step number (from 1) and fires once: if a rollback replays
that step, it does not fire again, as a transient hardware or data fault would not.
"""

from __future__ import annotations

import errno
import os
import signal

import torch

from llmstable.config import FaultConfig


class FaultInjector:
    def __init__(self, cfg: FaultConfig, vocab_size: int, rank: int = 0):
        self.cfg, self.vocab_size = cfg, vocab_size
        self.here = cfg.rank is None or cfg.rank == rank  # faults may hit one rank only (not the LR: it is global)
        self.fired: set[int] = set()  # steps whose faults have fired; kept across rollbacks by the trainer
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

    def step_done(self, step: int) -> None:
        """After step `step`: its faults have fired; SIGKILL now if asked."""
        self.fired.add(step)
        if self.cfg.kill_at_step == step and self.here:
            os.kill(os.getpid(), signal.SIGKILL)

    def checkpoint_hook(self, step: int):
        """A callback for the middle of writing checkpoint `step` (files written, manifest and rename not yet): a
        SIGKILL, or a full disk (ENOSPC, as the writer would get it)."""
        if not self.here:
            return None
        if self.cfg.kill_in_checkpoint_at_step == step:
            return lambda: os.kill(os.getpid(), signal.SIGKILL)
        if self.cfg.disk_full_at_step == step:
            return lambda: _disk_full(step)
        return None


def _disk_full(step: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"checkpoint of step {step} (fault.disk_full_at_step)")
