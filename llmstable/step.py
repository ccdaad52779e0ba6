"""One optimizer update: the part of the loop that touches the model. `Trainer.fit` (llmstable.trainer) calls it
once per step and decides what to do with what it returns; it reads straight down:
  1. `begin_step` hooks; a replay point (data position and RNG states) if a stabilizer may ask for a replay;
  2. forward and loss for each micro-batch (the loss hooks: a replacing loss, then `on_loss`), then backward;
  3. the gradient hooks, clipping, and the one host sync per step: the rank-mean loss and the pre-clip gradient
     norm together, so every rank holds the same two numbers and decides alike;
  4. the step-check hooks (the first action wins; a `replay` recomputes 2 and 3 from the replay point);
  5. unless a hook objected: `before_update`, the optimizer step, `on_update`; then the gradients are dropped.
At logged steps it also measures the leading indicators (llmstable.indicators): the logits' during 2 and 3, the
update's around 5.
"""

from __future__ import annotations

import torch

from llmstable.fingerprint import fingerprint
from llmstable.compiled import is_compile_error
from llmstable.config import TrainConfig
from llmstable.losses import training_loss
from llmstable.faults import FaultInjector
from llmstable.indicators import LogitIndicators, UpdateNorm
from llmstable.parallel.engines import Engine
from llmstable.device import autocast_for
from llmstable.rng import rng_state, set_rng_state
from llmstable.stabilizers import Stabilizer


class TrainStep:
    """`update(step, lr, indicators, rollbacks) -> (loss, pre-clip grad norm, action or None, indicators)`, with
    `step` the number of the step being computed (from 1). With indicators=True (logged steps) it also measures the
    update norm, the worst layer's gradient norm and the logits' indicators (attention-logit maximum, output log Z
    and maximum). `first_batch_hash` is rank 0's first micro-batch of the run
    (the trainer saves and restores it with its state)."""

    def __init__(self, cfg: TrainConfig, engine: Engine, stabilizers: list[Stabilizer], loader, faults: FaultInjector,
                 forward, signals=None):
        self.cfg, self.engine, self.stabilizers, self.loader = cfg, engine, stabilizers, loader
        self.faults, self.forward, self.signals = faults, forward, signals
        self.stop_agreed = False  # some rank received a preemption signal before this step's all-reduce
        self.model, self.world, self.device = engine.model, engine.world, engine.world.device
        self.replays = any(s.replays for s in stabilizers)  # only then is a replay point kept each step
        self.logits = LogitIndicators(self.model)  # (its hooks see the forward passes of the compiled model too)
        self.first_batch_hash: str | None = None

    def __call__(self, step: int, lr: float, indicators: bool, rollbacks: int):
        engine = self.engine
        engine.set_lr(lr)
        for stabilizer in self.stabilizers:
            stabilizer.begin_step(step, indicators)
        self.logits.begin(indicators)
        replay_point = (self.loader.state_dict(), rng_state()) if self.replays else None
        values = self.first_gradients(step) if not getattr(self.forward, "settled", True) else self.gradients(step)
        action = self.check_step(step, values, replay_point, rollbacks)
        extra = self.logits.values(self.world) if indicators else {}  # host sync, logged steps only
        if action is None and not engine.fused_step:
            update_norm = UpdateNorm(self.model) if indicators else None
            for stabilizer in self.stabilizers:
                stabilizer.before_update(self.model)
            engine.step()
            for stabilizer in self.stabilizers:
                stabilizer.on_update(self.model)
            if update_norm is not None:
                extra.update(update_norm.after_step())
        engine.zero_grad()
        return values["loss"], values["grad_norm"], action, extra

    def gradients(self, step: int) -> dict[str, float]:
        """Forward and backward over the micro-batches, the gradient hooks and clipping; returns the step's loss
        and pre-clip gradient norm as host floats."""
        self.logits.restart()  # (a replay measures its own forward passes)
        loss = self.forward_backward(step)  # (DeepSpeed: its update happens here, in the last micro-batch's backward)
        if not self.engine.fused_step:
            for stabilizer in self.stabilizers:
                stabilizer.on_gradients(self.model)
        grad_norm = self.engine.clip_grad_norm_(self.cfg.train.max_norm)  # global, before clipping
        # The step's one all-reduce carries the preemption flag with the loss, so every rank stops at the same step.
        flag = float(self.signals is not None and self.signals.requested)
        loss_mean, stop = self.world.mean(torch.stack([loss, torch.full_like(loss, flag)])).unbind()
        loss_value, norm_value, stop_value = torch.stack([loss_mean, grad_norm.float().to(loss.device), stop]).tolist()
        self.stop_agreed = stop_value > 0
        return {"loss": loss_value, "grad_norm": norm_value}

    def first_gradients(self, step: int) -> dict[str, float]:
        """`gradients` while a compiled model has not yet run a whole step (llmstable.compiled.CompiledForward): a
        compile error in the lazily compiled backward makes the model eager, and the step is computed again from
        the same data and RNG state, so the run's numbers are those of an eager run."""
        point = (self.loader.state_dict(), rng_state())
        try:
            values = self.gradients(step)
        except Exception as err:
            if not is_compile_error(err):
                raise
            self.forward.fall_back(err)
            self.engine.zero_grad()
            self.loader.load_state_dict(point[0])
            set_rng_state(point[1])
            values = self.gradients(step)
        self.forward.settled = True
        return values

    def check_step(self, step: int, values: dict[str, float], replay_point, rollbacks: int):
        """The step-check hooks in order; the first action wins. A `replay` recomputes the step from the replay
        point (same data, same RNG), hands both results to the stabilizer that asked, and goes on with the
        replayed ones (`values` is updated in place)."""
        for stabilizer in self.stabilizers:
            action = stabilizer.check_step(step, values, rollbacks)
            if action is not None and action.kind == "replay":
                if replay_point is None:
                    raise RuntimeError(f"stabilizer {stabilizer.name!r} asked for a replay but does not declare "
                                       "`replays = True`, or the engine cannot replay (DeepSpeed updates in backward)")
                first = dict(values)
                self.engine.zero_grad()
                self.loader.load_state_dict(replay_point[0])
                set_rng_state(replay_point[1])
                values.update(self.gradients(step))
                action = stabilizer.on_replay(step, first, dict(values))
            if action is not None:
                return action
        return None

    def forward_backward(self, step: int) -> torch.Tensor:
        """Forward and backward over the accumulation micro-batches; returns the step's mean loss (a device
        tensor, not yet synced)."""
        cfg, world = self.cfg.train, self.world
        share = cfg.global_batch_size // world.world_size  # this rank's samples of the global batch
        accum = share // cfg.micro_batch_size
        rows, _ = self.loader.next_share(cfg.global_batch_size, world.rank * share, (world.rank + 1) * share)
        total = torch.zeros((), device=self.device)
        for i in range(accum):
            batch = rows[i * cfg.micro_batch_size: (i + 1) * cfg.micro_batch_size]
            if step == 1 and self.first_batch_hash is None:
                self.first_batch_hash = fingerprint([batch])  # (rank 0's first micro-batch)
            batch = self.faults.batch(step, batch).to(self.device, non_blocking=True)
            self.engine.set_sync(last=i == accum - 1)
            with autocast_for(self.device, cfg.precision):
                logits = self.forward(batch[:, :-1])
                base = self.faults.loss(step, training_loss(self.stabilizers, logits, batch[:, 1:]))
                loss = base
                for stabilizer in self.stabilizers:
                    loss = stabilizer.on_loss(logits, loss)
            self.logits.add_output(logits)  # (logged steps only)
            self.engine.backward(loss, accum)
            total += base.detach() / accum  # train/loss is the training loss alone; auxiliary terms log apart
        return total
