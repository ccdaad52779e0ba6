"""The training loop. `train(cfg) -> summary` is what the CLI, the tests and the benchmarks call.

Build first, then run: `build_trainer` constructs every part with small builders; `Trainer.__init__` only
assigns; `Trainer.fit` runs the loop, which reads straight down:
  1. set the learning rate (times the stabilizers' `lr_factor`), then `begin_step`;
  2. one update (llmstable.step.TrainStep): forward and loss for each micro-batch, the loss hooks, backward;
  3. the gradient hooks, clip, read loss and gradient norm (the one host sync per step), the step-check hooks,
     then the optimizer step unless a hook asked to skip it, with the update hooks around it;
  4. carry out a rollback or abort if a hook asked for one;
  5. log (with what the stabilizers noted: `events`), evaluate and checkpoint at their intervals.
The parts around the loop live beside it: the run directory, resume choice, saving and restoring in
llmstable.resume; the rollback policy in llmstable.recovery. A rollback is a resume from the last good checkpoint
plus a data skip: both go through `Trainer.restore`.

Distributed runs (llmstable.parallel) go through the same loop: every rank runs it, reads its own share of each
global batch, and sees the same reduced loss and gradient norm, so every decision (log, spike, rollback, stop)
is taken alike on every rank. Rank 0 alone writes the run directory's files.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from llmstable import checkpoint as ckpt
from llmstable.compiled import compiled_forward
from llmstable.config import ConfigError, TrainConfig, to_dict
from llmstable.config.engines import engine_traits
from llmstable.data import DataBundle, build_data
from llmstable.data.packing import SkipList
from llmstable.evaluate import validation_metrics
from llmstable.fingerprint import fingerprint
from llmstable.faults import FaultInjector
from llmstable.metrics import QuietLog, RunLog, StepMeter, run_summary
from llmstable.optimizers import build_optimizer
from llmstable.optimizers.counting import state_bytes
from llmstable.parallel.build import build_engine
from llmstable.parallel.engines import Engine
from llmstable.parallel.world import World, init_world
from llmstable.preemption import EvalInterrupted, Preempted, SignalFlag
from llmstable.progress import Progress
from llmstable.recovery import Rollback, Target, zero_moments
from llmstable.resume import Claim, RunDirectory
from llmstable.device import memory_mb, use_deterministic_algorithms
from llmstable.rng import seed_everything
from llmstable.schedule import lr_factor
from llmstable.step import TrainStep
from llmstable.stabilizers import Capabilities, Stabilizer, build_model_and_stabilizers
from llmstable.stabilizers.hooks import log_stabilizer_events
from llmstable.stabilizers.hooks import lr_factor as stabilizer_lr_factor

logger = logging.getLogger("llmstable")


class SpikeAbort(RuntimeError):
    """The spike guard gave up (max_rollbacks reached); the last good checkpoint is intact."""


def train(cfg: TrainConfig, extra_stabilizers: tuple = (), claim: Claim | None = None,
          signals: SignalFlag | None = None) -> dict:
    """Train (or resume) the run described by cfg; returns the summary also written to summary.json. Raises
    `Preempted` (llmstable.preemption) after checkpointing when a preemption signal or Ctrl-C stopped the run.
    `claim`: what the command already decided about the run directory on this rank (llmstable.resume.Claim);
    `signals`: the command's installed preemption flag (by default the run installs its own, for its duration)."""
    own = signals is None
    signals = SignalFlag(cfg.train.preempt_signals).install() if own else signals  # a signal only sets a flag
    world = init_world(cfg.distributed, cfg.train.device)
    try:
        trainer = build_trainer(cfg, world, extra_stabilizers, signals, claim)
        try:
            summary = trainer.fit()
        except BaseException:
            trainer.run.close(clean=False)  # waits for a checkpoint being written, then unlocks
            raise
        finally:
            log_stabilizer_events(trainer.log, trainer.stabilizers)  # what was noted before an abort
            trainer.log.close()
        trainer.run.close()
    except BaseException:
        world.close(clean=False)  # no barrier: the other ranks may be gone or stuck in a collective
        raise
    finally:
        if own:
            signals.uninstall()
    world.close()
    return summary


# --- builders --------------------------------------------------------------------------------------------------


def build_trainer(cfg: TrainConfig, world: World | None = None, extra_stabilizers: tuple = (),
                  signals: SignalFlag | None = None, claim: Claim | None = None) -> Trainer:
    """Every part of the run, built in order. `extra_stabilizers`: stabilizers built by the caller (plug-ins that
    live outside the package), run after the configured ones."""
    world = world or init_world(cfg.distributed, cfg.train.device)
    problems: list[str] = []
    cfg.validate_ranks(problems, world.world_size)  # (the config did with the launcher's; a caller's world may differ)
    if problems:
        raise ConfigError(problems)
    run = RunDirectory(cfg, world)
    claimed = run.claim(claim)  # checked and locked (and a resume's config compared) before anything is written
    try:
        return _build(cfg, world, run, claimed, extra_stabilizers, signals or SignalFlag([]))
    except BaseException:
        run.close(clean=False)
        raise


def _build(cfg: TrainConfig, world: World, run: RunDirectory, claimed: Claim, extra_stabilizers: tuple,
           signals: SignalFlag) -> Trainer:
    seed_everything(cfg.train.seed)
    use_deterministic_algorithms(cfg.train.deterministic)
    device = world.device
    data = build_data(cfg.data, cfg.train.seed, min_train_blocks=cfg.train.global_batch_size)
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < data.vocab_size:
        raise ConfigError([
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {data.vocab_size} ids: "
            f"set model.vocab_size={data.vocab_size} or null (take the tokenizer's size)"
        ])
    torch.manual_seed(cfg.train.seed)  # the initial weights depend on the seed alone, not on data loading
    capabilities = Capabilities(fused_step=engine_traits(cfg.distributed).fused_step)
    model, stabilizers = build_model_and_stabilizers(cfg, data.vocab_size, device, capabilities,
                                                     extra=extra_stabilizers)
    if cfg.train.init_from:
        ckpt.load_initial_weights(model, Path(cfg.train.init_from))
    state = model.state_dict()  # every rank holds the same weights until they are sharded
    init_hash = fingerprint(state[k] for k in sorted(state))
    sizes = {"num_params": model.num_params(), "non_embedding_params": model.non_embedding_params(),
             "flops_per_token": model.flops_per_token(cfg.data.seq_len)}
    engine = build_engine(cfg, world, model,
                          lambda m: build_optimizer(cfg.optimizer, m, device, cfg.total_steps), run.path)
    log = RunLog(run.path, cfg.logging, to_dict(cfg)) if world.is_main else QuietLog()
    faults = FaultInjector(cfg.fault, data.vocab_size, world.rank, run.path)
    faults.attach(engine.model)
    for stabilizer in stabilizers:
        stabilizer.bind_optimizer(engine.base_optimizer)
    rollback = Rollback(cfg.stabilizer.spike_guard, cfg.train.global_batch_size)
    return Trainer(cfg, engine, stabilizers, data, log, faults, run, rollback, claimed, init_hash, sizes, signals)


# --- the trainer -----------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: TrainConfig, engine: Engine, stabilizers: list[Stabilizer], data: DataBundle, log: RunLog,
                 faults: FaultInjector, run: RunDirectory, rollback: Rollback, claimed: Claim,
                 init_hash: str, sizes: dict, signals: SignalFlag):
        self.cfg, self.engine, self.stabilizers, self.data = cfg, engine, stabilizers, data
        self.model, self.world, self.device = engine.model, engine.world, engine.world.device
        self.log, self.faults, self.run, self.rollback = log, faults, run, rollback
        self.resume_from, self.config_changes, self.signals = claimed.resume_from, claimed.config_changes, signals
        self.forward = compiled_forward(engine.module, cfg.train.compile, self.device, engine.can_compile)
        self.update = TrainStep(cfg, engine, stabilizers, data.train, faults, self.forward, signals)
        self.fresh_init_hash = init_hash  # of the weights as built, before any sharding
        self.sizes = sizes  # num_params, flops_per_token: measured before sharding (ZeRO-3 empties parameters)
        self.step = 0
        self.tokens = 0
        self.meter = StepMeter(sizes["flops_per_token"], self.device)  # the metrics row since the last one
        self.val_history: list[tuple[int, float]] = []
        self.init_hash: str | None = None  # of the initial weights (and TrainStep's of the first batch): arms compare them
        self.initial_loss: float | None = None  # the first step's loss, on the initial weights (compare uses it)
        self.diverged_step: int | None = None
        self.eval_pending = False  # a preemption cut the evaluation of this step short: a resume runs it first
        self.last_saved_step: int | None = None
        self.saved_at: dict[int, tuple[int, float]] = {}  # checkpoint step -> (tokens, seconds the loop was blocked)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    # --- the loop ----------------------------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg, total = self.cfg, self.cfg.total_steps
        self.start()
        done = self.run.path / "summary.json"
        if self.step >= total and done.exists():  # resumed a finished run: its summary stands
            self.log.event("already_complete", self.step)
            return json.loads(done.read_text())
        self._started = (self.step, self.tokens, time.perf_counter())  # also for the summary of an aborted run
        bar = Progress("train", total=total, initial=self.step, enabled=cfg.train.progress and self.world.is_main,
                       unit="step")  # a live bar on a terminal, a plain line every 20 s in a log
        self.meter.restart(self.tokens)
        try:
            while self.step < total:
                lr = (cfg.optimizer.lr * lr_factor(self.step, total, cfg.schedule) * self.rollback.ledger.lr_scale
                      * stabilizer_lr_factor(self.stabilizers, self.step + 1))
                lr = self.faults.lr(self.step + 1, lr)
                if self.run.checkpoint_due(self.step + 1) and (warning := self.run.space_warning(self.step + 1)):
                    self.log.event("disk_warning", self.step + 1, message=warning)
                log_now = (self.step + 1) % cfg.train.log_interval == 0 or self.step + 1 == total
                loss, grad_norm, action, indicators = self.train_step(lr, indicators=log_now)
                if not self.rollback.guarded and not np.isfinite(loss):  # diverged: a result, not a crash; stop here
                    self.diverged_step = self.step + 1
                    self.log.event("diverged", self.diverged_step, loss=loss)
                    break
                self.faults.step_done(self.step + 1, before_kill=self.run.checkpointer.wait)
                if action is not None and action.kind != "skip_step":
                    self.recover(action, loss, grad_norm)  # rollback (self.step goes back) or abort (raises)
                    bar.reset(total=total)
                    bar.update(self.step)
                    self.meter.restart(self.tokens)
                    self.step_boundary()
                    continue
                self.step += 1
                self.tokens += cfg.tokens_per_step
                self.meter.add(loss)
                if self.step == 1 and self.initial_loss is None:
                    self.initial_loss = loss
                self.after_step(action)
                bar.update(1)
                if self.step % cfg.train.log_interval == 0 or self.step == total:
                    bar.set_postfix(self.log_metrics(lr, grad_norm, indicators))
                if self.step % cfg.train.eval_interval == 0 or self.step == total:
                    if self.update.stop_agreed:  # a stop agreed in this step: the evaluation runs after the resume
                        self.eval_pending = True
                        self.preempt()
                    self.evaluate()
                if self.run.checkpoint_due(self.step):
                    self.save()
                self.step_boundary()
        finally:
            bar.close()
        self.run.checkpointer.wait()
        self.log_checkpoints()
        wall_s = time.perf_counter() - self._started[2]
        return self.finish(wall_s, (self.tokens - self._started[1]) / max(wall_s, 1e-9), self._started[0])

    def train_step(self, lr: float, indicators: bool = False):
        """One optimizer update at learning rate lr (`llmstable.step.TrainStep`): returns (loss, pre-clip grad
        norm, action or None, leading indicators)."""
        return self.update(self.step + 1, lr, indicators, self.rollback.ledger.rollbacks)

    def log_metrics(self, lr: float, grad_norm: float, indicators: dict) -> dict:
        """One row of metrics.jsonl for the steps since the last row; returns the progress bar's fields."""
        extra = dict(indicators)  # then the stabilizers', the optimizer's if it reports any, the spike counters
        for stabilizer in self.stabilizers:
            extra.update(stabilizer.metrics())
        extra.update(self.engine.optimizer_metrics())
        extra.update(self.rollback.metrics())
        row = self.meter.row(self.step, self.tokens, lr, grad_norm, extra)
        self.log.metrics(row)
        fields = {"loss": f"{row['train/loss']:.3f}", "lr": f"{lr:.2e}", "tok_s": f"{row['perf/tokens_per_sec']:,.0f}"}
        if self.rollback.ledger.spikes:
            fields.update(spikes=self.rollback.ledger.spikes, rollbacks=self.rollback.ledger.rollbacks)
        return fields

    def evaluate(self) -> float:
        """Mean loss over the first eval_samples validation blocks (the same blocks at every evaluation, on every
        rank: so every rank makes the same forward calls and holds the same value). A preemption signal between
        two batches stops the run there (the checkpoint notes the evaluation, which its resume runs first)."""
        self.model.eval()
        blocks = self.data.val_blocks[: self.cfg.train.eval_samples]
        try:
            values = validation_metrics(self.forward, blocks, self.cfg.train.micro_batch_size, self.device,
                                        self.cfg.train.precision, self.cfg.loss,
                                        between=self.stop_in_evaluation)  # host sync, once per evaluation
        except EvalInterrupted:
            self.model.train()
            self.eval_pending = True
            self.preempt()
        self.model.train()
        self.eval_pending = False
        val_loss = values["val/loss"]
        self.val_history.append((self.step, val_loss))
        self.log.metrics({"step": self.step, "tokens": self.tokens, **values})
        self.log.event("eval", self.step, val_loss=val_loss)
        return val_loss

    # --- stopping on a signal (llmstable.preemption) -------------------------------------------------------------

    def step_boundary(self) -> None:
        """After each step: log the checkpoints written since, raise a failed background write, and stop if every
        rank has agreed (in the step's all-reduce) that a preemption signal came."""
        self.log_checkpoints()
        self.run.checkpointer.check()
        if self.update.stop_agreed:
            self.preempt()

    def stop_in_evaluation(self, batch: int) -> bool:
        """Between evaluation batches: whether a preemption signal came, agreed by every rank (a small all-reduce
        of the flag when there are several; every rank runs the same batches)."""
        self.faults.in_evaluation(self.step, batch)
        flag = torch.tensor([float(self.signals.requested)], device=self.device)
        return bool(self.world.mean(flag).item() > 0) if self.world.world_size > 1 else self.signals.requested

    def preempt(self) -> None:
        """Write a checkpoint of this step (unless one was just written), wait for it, and stop with Preempted."""
        if self.last_saved_step != self.step or self.eval_pending:
            self.save()
        try:
            self.run.checkpointer.wait()
        finally:  # every rank stays until rank 0's write is on disk: a launcher tears the job down at the first exit
            self.world.barrier()
        self.log_checkpoints()
        path = self.run.checkpoints / ckpt.checkpoint_name(self.step)
        received = self.signals.received or "a signal on another rank"
        self.log.event("preempted", self.step, signal=received, checkpoint=str(path), eval_pending=self.eval_pending)
        raise Preempted(f"{received} at step {self.step}: checkpoint {path} is written; run the same command again "
                        "to resume")

    def log_checkpoints(self) -> None:
        """A `checkpoint` event for each checkpoint committed since the last call (with the time the loop spent)."""
        for step, path in self.run.checkpointer.completed():
            tokens, blocked_s = self.saved_at.pop(step, (None, None))
            self.log.event("checkpoint", step, path=str(path), tokens=tokens,
                           blocked_s=None if blocked_s is None else round(blocked_s, 4))

    # --- spikes: skip, roll back, abort --------------------------------------------------------------------------

    def after_step(self, action) -> None:
        for event in self.engine.optimizer_events():
            self.log.event(event.pop("event"), self.step, **event)
        log_stabilizer_events(self.log, self.stabilizers)  # warnings, SDC suspects
        if action is not None:  # a skipped update
            log_spikes(self.log, self.step, self.tokens, action)
            self.log.event("skip_step", self.step, tokens=self.tokens)
        for step in self.rollback.step_done(self.step, skipped=action is not None):
            self.run.mark_good(step)

    def recover(self, action, loss: float, grad_norm: float) -> None:
        """Carry out the rollback policy's plan: restore the last good checkpoint, skip the data since, maybe cut
        the LR and reset the moments; or abort (raise SpikeAbort, leaving the good checkpoint intact)."""
        spike_step, spike_tokens = self.step + 1, self.tokens + self.cfg.tokens_per_step
        good = self.run.latest_good()
        target = None
        if good is not None:  # (rank 0 reads the checkpoint's step and data position; every rank gets them)
            target = Target(good, *self.world.broadcast(self.run.step_and_ordinal(good) if self.world.is_main else None))
        plan = self.rollback.plan(action, self.data.train.ordinal, target)
        log_spikes(self.log, spike_step, spike_tokens, action)
        ledger = self.rollback.ledger
        if plan.kind == "abort":
            self.log.event("abort", spike_step, rollbacks=ledger.rollbacks, checkpoint=str(good))
            start_step, start_tokens, t_start = self._started
            wall_s = time.perf_counter() - t_start
            self.finish(wall_s, (self.tokens - start_tokens) / max(wall_s, 1e-9), start_step, aborted=True)
            raise SpikeAbort(self.rollback.ladder.abort_message(spike_step, loss, grad_norm, ledger.rollbacks, good))
        self.restore(good, keep_ledger=True, step=target.step)  # one code path with resume; the ledger stays
        self.run.abandon_after(target.step)
        self.rollback.carried_out(plan)
        self.data.train.skip = SkipList(ledger.skip_ranges)
        (start, end) = plan.skip
        self.log.event("rollback", spike_step, tokens=spike_tokens, to_step=self.step, to_tokens=self.tokens,
                       checkpoint=str(good))
        self.log.event("skip_data", spike_step, tokens=spike_tokens, start=start, end=end, samples=end - start)
        if plan.lr_factor != 1.0:
            self.log.event("lr_cut", spike_step, factor=plan.lr_factor, lr_scale=ledger.lr_scale)
        if plan.reset_moments:
            zero_moments(self.engine.base_optimizer, self.cfg.optimizer.moment_keys)
            self.log.event("moment_reset", spike_step)
        self.save(good=True)  # the good state with the plan carried out: a resume from here skips the same data

    # --- run state: start, save, restore ------------------------------------------------------------------------

    def start(self) -> None:
        """Resume from the checkpoint chosen when the run directory was claimed, or start afresh."""
        self.run.write_tokenizer(self.data.tokenizer)
        path = self.resume_from
        if path is not None:
            self.restore(path)
            self.run.write_config()  # only once the resume has passed its checks
            for change in self.config_changes:  # (each accepted when the run directory was claimed)
                if self.world.is_main:
                    logger.warning("resuming %s with a changed config: %s", path, change)
                self.log.event("config_change", 0, change=change)
            self.log.event("resume", self.step, checkpoint=str(path), tokens=self.tokens)
            self.last_saved_step = self.step
            if self.eval_pending:  # the evaluation a preemption cut short
                self.evaluate()
            return
        self.run.write_config()
        self.init_hash = self.fresh_init_hash
        self.log.event("start", 0, num_params=self.sizes["num_params"], total_steps=self.cfg.total_steps,
                       init_hash=self.init_hash, engine=self.engine.name, world_size=self.world.world_size)
        if self.rollback.guarded:  # a rollback target from the start: the initial weights are good by definition
            self.save(good=True)

    def state_dict(self) -> dict:
        """What continues the run besides the model, the optimizer and the RNGs (which the checkpoint holds)."""
        return {
            "step": self.step, "tokens": self.tokens,
            **self.meter.state_dict(),
            "val_history": self.val_history,
            "data": self.data.train.state_dict(),
            "stabilizers": {s.name: s.state_dict() for s in self.stabilizers},
            **self.rollback.state_dict(),
            "init_hash": self.init_hash, "first_batch_hash": self.update.first_batch_hash, "initial_loss": self.initial_loss,
            "engine": self.engine.checkpoint_meta(), "eval_pending": self.eval_pending,
        }

    def load_state_dict(self, state: dict, keep_ledger: bool = False) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        self.meter.load_state_dict(state)
        self.val_history = [tuple(v) for v in state["val_history"]]
        self.data.train.load_state_dict(state["data"])
        for stabilizer in self.stabilizers:
            stabilizer.load_state_dict(state["stabilizers"].get(stabilizer.name, {}))
        self.rollback.load_state_dict(state, keep_ledger)
        self.data.train.skip = SkipList(self.rollback.ledger.skip_ranges)
        self.eval_pending = bool(state.get("eval_pending", False))
        self.init_hash, self.update.first_batch_hash = state.get("init_hash"), state.get("first_batch_hash")
        self.initial_loss = state.get("initial_loss")

    def save(self, good: bool = False) -> Path:
        """Checkpoint this step; the loop blocks only for a snapshot when the write goes to the background (its
        `checkpoint` event is logged once it is on disk: log_checkpoints)."""
        started = time.perf_counter()
        path = self.run.save(self.engine, self.step, self.state_dict(), good=good or not self.rollback.guarded,
                             before_commit=self.faults.checkpoint_hook(self.step))
        self.saved_at[self.step] = (self.tokens, time.perf_counter() - started)
        self.last_saved_step = self.step
        self.rollback.saved(self.step, good)
        return path

    def restore(self, path: Path, keep_ledger: bool = False, step: int | None = None) -> None:
        """Everything that decides the future of the run, as of checkpoint `path` (resume), except the ledger
        with keep_ledger (rollback: counters, skip list and LR scale stay as they are now). A rollback passes the
        checkpoint's `step`, so the ring's copy in memory is used when it holds one."""
        self.load_state_dict(self.run.load(self.engine, path, step), keep_ledger)

    # --- the end of the run --------------------------------------------------------------------------------------

    def finish(self, wall_s: float, tokens_per_sec: float, start_step: int, aborted: bool = False) -> dict:
        summary = run_summary(
            self.val_history, self.rollback.ledger, aborted, self.diverged_step, self.step, tokens=self.tokens,
            wall_s=wall_s, tokens_per_sec=tokens_per_sec, resumed_from_step=start_step or None,
            **self.sizes, engine=self.engine.name, world_size=self.world.world_size,
            peak_memory_mb=max(self.meter.peak_memory_mb, memory_mb(self.device)), init_hash=self.init_hash,
            first_batch_hash=self.update.first_batch_hash, initial_loss=self.initial_loss,
            optimizer_state_bytes=state_bytes(self.engine.optimizer), name=self.cfg.name, run_dir=str(self.run.path))
        self.log.summary(summary)
        if aborted or self.diverged_step is not None:
            return summary
        self.log.event("end", self.step, final_val_loss=summary["final_val_loss"])
        if self.cfg.train.plot and self.world.is_main:
            from llmstable.loss_plot import plot_losses

            plot_losses(self.run.path)
        if self.cfg.train.sample_tokens > 0:
            from llmstable.generate import print_sample

            print_sample(self.engine, self.cfg, self.data, self.step)  # (a collective when sharded)
        return summary


def log_spikes(log: RunLog, step: int, tokens: int, action) -> None:
    """A `spike` event per detection of the step's action."""
    for d in action.detections:
        log.event("spike", step, tokens=tokens, metric=d.metric, value=d.value, threshold=d.threshold, rule=d.rule,
                  **d.details)  # details: the layer it came from (llmstable.stabilizers.localize)
