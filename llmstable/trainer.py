"""The training loop. `train(cfg) -> summary` is what the CLI, the tests and the benchmarks call.

Build first, then run: `build_trainer` constructs every part with small builders; `Trainer.__init__` only
assigns; `Trainer.fit` runs the loop, which reads straight down:
  1. set the learning rate;
  2. forward and loss for each micro-batch, then the loss hooks, then backward;
  3. clip, read loss and gradient norm (the one host sync per step), the step-check hooks, then the optimizer
     step unless a hook asked to skip it;
  4. carry out a rollback or abort if a hook asked for one;
  5. log, evaluate and checkpoint at their intervals.
A rollback is a resume from the last good checkpoint plus a data skip: both go through `Trainer.restore`.

Distributed runs (llmstable.parallel) go through the same loop: every rank runs it, reads its own share of each
global batch, and sees the same reduced loss and gradient norm, so every decision (log, spike, rollback, stop)
is taken alike on every rank. Rank 0 alone writes the run directory's files.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from llmstable import checkpoint as ckpt
from llmstable.config import ConfigError, TrainConfig, to_dict
from llmstable.data import DataBundle, build_data
from llmstable.data.loader import SkipList
from llmstable.faults import FaultInjector
from llmstable.metrics import QuietLog, RunLog
from llmstable.optimizers import build_optimizer
from llmstable.parallel import Engine, World, build_engine, init_world
from llmstable.recovery import Ledger, config_changes, zero_moments
from llmstable.runtime import autocast_for, memory_mb, rng_state, seed_everything, set_rng_state
from llmstable.schedule import lr_factor
from llmstable.stabilizers import Stabilizer, build_model_and_stabilizers


class SpikeAbort(RuntimeError):
    """The spike guard gave up (max_rollbacks reached); the last good checkpoint is intact."""


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) the run described by cfg; returns the summary also written to summary.json."""
    world = init_world(cfg.distributed, cfg.train.device)
    try:
        trainer = build_trainer(cfg, world)
        try:
            summary = trainer.fit()
        finally:
            trainer.log.close()
    except BaseException:
        world.close(clean=False)  # no barrier: the other ranks may be gone or stuck in a collective
        raise
    world.close()
    return summary


# --- builders --------------------------------------------------------------------------------------------------


def build_trainer(cfg: TrainConfig, world: World | None = None) -> Trainer:
    world = world or init_world(cfg.distributed, cfg.train.device)
    run_dir = Path(cfg.run_dir)
    per_step = cfg.train.micro_batch_size * world.world_size
    if cfg.train.global_batch_size % per_step:
        raise ConfigError([
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by train.micro_batch_size="
            f"{cfg.train.micro_batch_size} x {world.world_size} ranks = {per_step}: every rank needs whole "
            "micro-batches; lower train.micro_batch_size or change the global batch"
        ])
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    world.barrier()
    seed_everything(cfg.train.seed)
    device = world.device
    data = build_data(cfg.data, cfg.train.seed, min_train_blocks=cfg.train.global_batch_size)
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < data.vocab_size:
        raise ConfigError([
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {data.vocab_size} ids: "
            f"set model.vocab_size={data.vocab_size} or null (take the tokenizer's size)"
        ])
    torch.manual_seed(cfg.train.seed)  # the initial weights depend on the seed alone, not on data loading
    model, stabilizers = build_model_and_stabilizers(cfg, data.vocab_size, device)
    if cfg.train.init_from:
        ckpt.load_initial_weights(model, Path(cfg.train.init_from))
    state = model.state_dict()  # every rank holds the same weights until they are sharded
    init_hash = ckpt.fingerprint(state[k] for k in sorted(state))
    sizes = {"num_params": model.num_params(), "flops_per_token": model.flops_per_token(cfg.data.seq_len)}
    engine = build_engine(cfg, world, model,
                          lambda m: build_optimizer(cfg.optimizer, m, device, cfg.total_steps), run_dir)
    log = RunLog(run_dir, cfg.logging, to_dict(cfg)) if world.is_main else QuietLog()
    faults = FaultInjector(cfg.fault, data.vocab_size, world.rank)
    return Trainer(cfg, engine, stabilizers, data, log, faults, run_dir, init_hash, sizes)


# --- the trainer -----------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: TrainConfig, engine: Engine, stabilizers: list[Stabilizer], data: DataBundle, log: RunLog,
                 faults: FaultInjector, run_dir: Path, init_hash: str, sizes: dict):
        self.cfg, self.engine, self.stabilizers, self.data = cfg, engine, stabilizers, data
        self.model, self.optimizer, self.world, self.device = engine.model, engine.optimizer, engine.world, engine.world.device
        self.log, self.faults, self.run_dir = log, faults, run_dir
        compile_ok = cfg.train.compile and engine.name != "deepspeed"
        self.forward = torch.compile(engine.module) if compile_ok else engine.module
        self.fresh_init_hash = init_hash  # of the weights as built, before any sharding
        self.sizes = sizes  # num_params, flops_per_token: measured before sharding (ZeRO-3 empties parameters)
        for stabilizer in stabilizers:
            if hasattr(stabilizer, "can_skip"):  # DeepSpeed updates before the guard looks: roll back instead
                stabilizer.can_skip = not engine.fused_step
        self.step = 0
        self.tokens = 0
        self.loss_sum = 0.0  # train loss summed over the steps since the last metrics row
        self.loss_steps = 0
        self.val_history: list[tuple[int, float]] = []
        self.ledger = Ledger()  # survives rollbacks (see llmstable.recovery)
        self.pending_good: list[int] = []  # checkpoint steps waiting for enough clean steps to become good
        self.guarded = cfg.stabilizer.spike_guard is not None
        self.init_hash: str | None = None  # of the initial weights, and of the first batch: arms compare them
        self.first_batch_hash: str | None = None
        self.diverged_step: int | None = None
        self.peak_memory_mb = 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    # --- the loop ----------------------------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg, train_cfg = self.cfg, self.cfg.train
        self.prepare_run_dir()
        total = cfg.total_steps
        done = self.run_dir / "summary.json"
        if self.step >= total and done.exists():  # resumed a finished run: its summary stands
            self.log.event("already_complete", self.step)
            return json.loads(done.read_text())
        flops_per_token = self.sizes["flops_per_token"]
        start_step, start_tokens, t_start = self.step, self.tokens, time.perf_counter()
        self._started = (start_step, start_tokens, t_start)  # for the summary of an aborted run
        bar = tqdm(total=total, initial=self.step, disable=not (train_cfg.progress and self.world.is_main), unit="step",
                   dynamic_ncols=True)
        t_log, tokens_log = time.perf_counter(), self.tokens
        while self.step < total:
            lr = cfg.optimizer.lr * lr_factor(self.step, total, cfg.schedule) * self.ledger.lr_scale
            lr = self.faults.lr(self.step + 1, lr)
            log_now = (self.step + 1) % train_cfg.log_interval == 0 or self.step + 1 == total
            loss, grad_norm, action, indicators = self.train_step(lr, indicators=log_now)
            if not self.guarded and not np.isfinite(loss):  # diverged: a result, not a crash; stop here
                self.diverged_step = self.step + 1
                self.log.event("diverged", self.diverged_step, loss=loss)
                break
            self.faults.step_done(self.step + 1)
            self.ledger.faults_fired = sorted(self.faults.fired)
            if action is not None and action.kind != "skip_step":
                self.recover(action, loss, grad_norm)  # rollback (self.step goes back) or abort (raises)
                bar.reset(total=total)
                bar.update(self.step)
                t_log, tokens_log = time.perf_counter(), self.tokens
                continue
            self.step += 1
            self.tokens += cfg.tokens_per_step
            self.loss_sum += loss
            self.loss_steps += 1
            self.after_clean_or_skipped_step(action)
            bar.update(1)
            last = self.step == total
            if self.step % train_cfg.log_interval == 0 or last:
                now = time.perf_counter()
                tokens_per_sec = (self.tokens - tokens_log) / max(now - t_log, 1e-9)
                row = {
                    "step": self.step, "tokens": self.tokens,
                    "train/loss": self.loss_sum / self.loss_steps,
                    "optim/lr": lr,
                    "optim/grad_norm": grad_norm,
                    "perf/tokens_per_sec": tokens_per_sec,
                    "perf/flops_per_sec": tokens_per_sec * flops_per_token,
                    **indicators, **self.plugin_metrics(),
                }
                self.log.metrics(row)
                self.peak_memory_mb = max(self.peak_memory_mb, memory_mb(self.device))
                bar.set_postfix(self.progress_fields(row))
                self.loss_sum, self.loss_steps = 0.0, 0
                t_log, tokens_log = now, self.tokens
            if self.step % train_cfg.eval_interval == 0 or last:
                self.evaluate()
            if (train_cfg.checkpoint_interval and self.step % train_cfg.checkpoint_interval == 0) or last:
                self.save()
        bar.close()
        wall_s = time.perf_counter() - t_start
        return self.finish(wall_s, (self.tokens - start_tokens) / max(wall_s, 1e-9), start_step)

    def train_step(self, lr: float, indicators: bool = False):
        """One optimizer update at learning rate lr: forward/backward over the micro-batches, clip, the step-check
        hooks, then the optimizer step unless a hook objects. Returns (loss, pre-clip grad norm, action or None,
        leading indicators); with indicators=True also the update norm and the worst layer's gradient norm."""
        engine = self.engine
        engine.set_lr(lr)
        loss = self.forward_backward()  # (DeepSpeed: its update happens here, in the last micro-batch's backward)
        grad_norm = engine.clip_grad_norm_(self.cfg.train.max_norm)  # global, before clipping
        # The one host sync per step: the rank-mean loss and the gradient norm together, for the spike check and
        # the log; every rank gets the same two numbers, so every rank decides alike.
        step_values = torch.stack([self.world.mean(loss), grad_norm.float().to(loss.device)])
        loss_value, norm_value = step_values.tolist()
        action = None
        for stabilizer in self.stabilizers:
            action = action or stabilizer.check_step(self.step + 1, {"loss": loss_value, "grad_norm": norm_value},
                                                     self.ledger.rollbacks)
        extra = {}
        if action is None and not engine.fused_step:
            before = self.layer_grad_norms_and_snapshot(extra) if indicators else None
            engine.step()
            if before is not None:
                extra["optim/update_norm"] = _full(torch.linalg.vector_norm(torch.stack([
                    _full(torch.linalg.vector_norm(p.detach() - b)) for p, b in zip(self.model.parameters(), before)
                ]))).item()  # host sync, at logged steps only
        engine.zero_grad()
        return loss_value, norm_value, action, extra

    def layer_grad_norms_and_snapshot(self, extra: dict) -> list[torch.Tensor]:
        """Leading indicators for logged steps: the largest per-block gradient norm (and which block), and a copy
        of the weights to measure the update against."""
        norms = [torch.linalg.vector_norm(torch.stack([_full(torch.linalg.vector_norm(p.grad))
                                                       for p in layer.parameters() if p.grad is not None]))
                 for layer in self.model.layers]
        worst = torch.stack(norms)
        extra["optim/worst_layer_grad_norm"] = worst.max().item()
        extra["optim/worst_layer"] = int(worst.argmax().item())
        return [p.detach().clone() for p in self.model.parameters()]

    def forward_backward(self) -> torch.Tensor:
        """Forward and backward over the accumulation micro-batches; returns the step's mean loss (a device
        tensor, not yet synced)."""
        micro, world = self.cfg.train.micro_batch_size, self.world
        share = self.cfg.train.global_batch_size // world.world_size  # this rank's samples of the global batch
        accum = share // micro
        rows, _ = self.data.train.next_share(self.cfg.train.global_batch_size, world.rank * share,
                                             (world.rank + 1) * share)
        total = torch.zeros((), device=self.device)
        for i in range(accum):
            batch = rows[i * micro: (i + 1) * micro]
            if self.step == 0 and self.first_batch_hash is None:
                self.first_batch_hash = ckpt.fingerprint([batch])  # (rank 0's first micro-batch)
            batch = self.faults.batch(self.step + 1, batch).to(self.device, non_blocking=True)
            self.engine.set_sync(last=i == accum - 1)
            with autocast_for(self.device, self.cfg.train.precision):
                logits = self.forward(batch[:, :-1])
                ce = self.faults.loss(self.step + 1, cross_entropy(logits, batch[:, 1:]))
                loss = ce
                for stabilizer in self.stabilizers:
                    loss = stabilizer.on_loss(logits, loss)
            self.engine.backward(loss, accum)
            total += ce.detach() / accum  # train/loss is the cross-entropy alone; auxiliary terms log apart
        return total

    def plugin_metrics(self) -> dict[str, float]:
        """Metrics of the stabilizers, of the optimizer if it reports any, and the spike counters."""
        out: dict[str, float] = {}
        for stabilizer in self.stabilizers:
            out.update(stabilizer.metrics())
        out.update(getattr(self.engine.base_optimizer, "metrics", dict)())
        if self.guarded:
            out.update({"stab/spike/spikes": self.ledger.spikes, "stab/spike/rollbacks": self.ledger.rollbacks,
                        "stab/spike/skipped_steps": self.ledger.skipped_steps})
        return out

    def progress_fields(self, row: dict) -> dict:
        fields = {"loss": f"{row['train/loss']:.3f}", "lr": f"{row['optim/lr']:.2e}",
                  "tok_s": f"{row['perf/tokens_per_sec']:,.0f}"}
        if self.ledger.spikes:
            fields.update(spikes=self.ledger.spikes, rollbacks=self.ledger.rollbacks)
        return fields

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first eval_samples validation blocks (the same blocks at every evaluation, on every
        rank: so every rank makes the same forward calls and holds the same value)."""
        self.model.eval()
        micro = self.cfg.train.micro_batch_size
        blocks = self.data.val_blocks[: self.cfg.train.eval_samples]
        losses, weights = [], []
        for i in range(0, len(blocks), micro):
            batch = blocks[i: i + micro].to(self.device)
            with autocast_for(self.device, self.cfg.train.precision):
                losses.append(cross_entropy(self.forward(batch[:, :-1]), batch[:, 1:]) * len(batch))
            weights.append(len(batch))
        val_loss = (torch.stack(losses).sum() / sum(weights)).item()  # host sync, once per evaluation
        self.model.train()
        self.val_history.append((self.step, val_loss))
        self.log.metrics({"step": self.step, "tokens": self.tokens, "val/loss": val_loss,
                          "val/ppl": float(np.exp(min(val_loss, 50.0)))})
        self.log.event("eval", self.step, val_loss=val_loss)
        return val_loss

    # --- spikes: skip, roll back, abort --------------------------------------------------------------------------

    def after_clean_or_skipped_step(self, action) -> None:
        for event in getattr(self.engine.base_optimizer, "pop_events", list)():
            self.log.event(event.pop("event"), self.step, **event)
        if action is not None:  # a skipped update
            self.ledger.spikes += 1
            self.ledger.skipped_steps += 1
            self.log_spikes(self.step, self.tokens, action)
            self.log.event("skip_step", self.step, tokens=self.tokens)
            self.pending_good.clear()  # what was saved just before a spike is not a safe place to return to
            return
        for saved in [s for s in self.pending_good if self.step - s >= self.good_after]:
            path = self.run_dir / "checkpoints" / ckpt.checkpoint_name(saved)
            if self.world.is_main and path.is_dir():  # (it may have been pruned meanwhile)
                ckpt.mark_good(path)
            self.pending_good.remove(saved)

    def log_spikes(self, step: int, tokens: int, action) -> None:
        for d in action.detections:
            self.log.event("spike", step, tokens=tokens, metric=d.metric, value=d.value, threshold=d.threshold,
                           rule=d.rule)

    def recover(self, action, loss: float, grad_norm: float) -> None:
        """Carry out a rollback (restore the last good checkpoint, skip the data since, maybe cut the LR and reset
        the moments) or an abort (raise SpikeAbort, leaving the good checkpoint intact)."""
        spike_step, spike_tokens = self.step + 1, self.tokens + self.cfg.tokens_per_step
        self.ledger.spikes += 1
        self.log_spikes(spike_step, spike_tokens, action)
        good = self.world.broadcast(ckpt.latest_good(self.run_dir / "checkpoints") if self.world.is_main else None)
        if action.kind == "abort" or good is None:
            self.log.event("abort", spike_step, rollbacks=self.ledger.rollbacks, checkpoint=str(good))
            start_step, start_tokens, t_start = self._started
            wall_s = time.perf_counter() - t_start
            self.finish(wall_s, (self.tokens - start_tokens) / max(wall_s, 1e-9), start_step, aborted=True)
            raise SpikeAbort(
                f"spike guard: spike at step {spike_step} (loss {loss:.4g}, grad norm {grad_norm:.4g}) after "
                f"{self.ledger.rollbacks} rollbacks (stabilizer.spike_guard.max_rollbacks="
                f"{self.cfg.stabilizer.spike_guard.max_rollbacks}); the last good checkpoint {good} is intact. "
                "Lower optimizer.lr, or inspect the data around the skipped samples in events.jsonl."
            )
        consumed_until = self.data.train.ordinal
        ledger = self.ledger
        self.restore(good, ledger=ledger)  # one code path with resume; the ledger does not go back
        margin = self.cfg.stabilizer.spike_guard.margin_steps * self.cfg.train.global_batch_size
        start, end = self.data.train.ordinal, consumed_until + margin
        self.data.train.skip.add(start, end)
        ledger.skip_ranges = self.data.train.skip.ranges
        ledger.rollbacks += 1
        ledger.skipped_samples += end - start
        self.log.event("rollback", spike_step, tokens=spike_tokens, to_step=self.step, to_tokens=self.tokens,
                       checkpoint=str(good))
        self.log.event("skip_data", spike_step, tokens=spike_tokens, start=start, end=end, samples=end - start)
        if action.lr_cut:
            ledger.lr_scale *= self.cfg.stabilizer.spike_guard.lr_cut_factor
            ledger.lr_cuts += 1
            self.log.event("lr_cut", spike_step, factor=self.cfg.stabilizer.spike_guard.lr_cut_factor,
                           lr_scale=ledger.lr_scale)
        if action.moment_reset:
            zero_moments(self.engine.base_optimizer)
            ledger.moment_resets += 1
            self.log.event("moment_reset", spike_step)
        self.pending_good.clear()

    @property
    def good_after(self) -> int:
        return self.cfg.stabilizer.spike_guard.good_after_steps if self.guarded else 0

    # --- run directory, checkpoints, resume ---------------------------------------------------------------------

    def prepare_run_dir(self) -> None:
        """Write config.yaml and the tokenizer, and resume from a checkpoint if the config says so."""
        if self.world.is_main:
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(to_dict(self.cfg)))
            if not (self.run_dir / "tokenizer").exists():
                self.data.tokenizer.save_pretrained(str(self.run_dir / "tokenizer"))
        path = self.world.broadcast(self.resume_path() if self.world.is_main else None)
        if isinstance(path, ConfigError):
            raise path
        if path is not None:
            self.check_config_changes(path)
            self.restore(path)
            self.log.event("resume", self.step, checkpoint=str(path), tokens=self.tokens)
        else:
            self.init_hash = self.fresh_init_hash
            self.log.event("start", 0, num_params=self.sizes["num_params"], total_steps=self.cfg.total_steps,
                           init_hash=self.init_hash, engine=self.engine.name, world_size=self.world.world_size)
            if self.guarded:  # a rollback target from the start: the initial weights are good by definition
                self.save(good=True)

    def resume_path(self) -> Path | ConfigError | None:
        """(Rank 0.) The checkpoint to resume from; an error is returned, not raised, so that every rank raises it."""
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume == "auto":
            return ckpt.latest_valid(self.run_dir / "checkpoints")
        path = Path(self.cfg.resume)
        if not path.is_dir():
            return ConfigError([f"resume={self.cfg.resume!r} is not a checkpoint directory: use auto, never, or a "
                                "path such as RUN_DIR/checkpoints/step_00000100"])
        return path

    def check_config_changes(self, path: Path) -> None:
        """Log harmless config changes since the checkpoint; refuse the others unless resume_force=true."""
        stored = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
        harmless, breaking = config_changes(stored, to_dict(self.cfg))
        for change in harmless:
            self.log.event("config_change", 0, change=change)
        if breaking and not self.cfg.resume_force:
            raise ConfigError([f"cannot resume {path} with a changed config: {c}" for c in breaking] + [
                "these change the model, data, seed or optimizer type: use a new run_dir, or pass "
                "resume_force=true to resume anyway"])

    def trainer_state(self) -> dict:
        return {
            "step": self.step, "tokens": self.tokens,
            "loss_sum": self.loss_sum, "loss_steps": self.loss_steps,
            "val_history": self.val_history,
            "data": self.data.train.state_dict(),
            "stabilizers": {s.name: s.state_dict() for s in self.stabilizers},
            "ledger": self.ledger.state_dict(),
            "pending_good": self.pending_good,
            "init_hash": self.init_hash, "first_batch_hash": self.first_batch_hash,
            "rng": rng_state(),
            "engine": {"name": self.engine.name, "format": self.engine.checkpoint_format,
                       "world_size": self.world.world_size, "zero_stage": getattr(self.engine, "stage", None)},
        }

    def save(self, good: bool = False) -> Path:
        path = ckpt.save_checkpoint(
            self.run_dir / "checkpoints", self.step, self.engine, self.trainer_state(),
            OmegaConf.to_yaml(to_dict(self.cfg)), keep=self.cfg.train.keep_checkpoints,
            before_commit=self.faults.checkpoint_hook(self.step), good=good or not self.guarded,
        )
        if self.guarded and not good:
            self.pending_good.append(self.step)
        self.log.event("checkpoint", self.step, path=str(path), tokens=self.tokens)
        return path

    def restore(self, path: Path, ledger: Ledger | None = None) -> None:
        """Everything that decides the future of the run, as of checkpoint `path` (resume), except the ledger
        when one is given (rollback: counters, skip list, LR scale and fired faults stay as they are now)."""
        problem = self.world.broadcast(ckpt.verify(path) if self.world.is_main else None)
        if problem is not None:
            raise ckpt.CheckpointError(f"cannot load checkpoint {path}: {problem}")
        state = ckpt.load_checkpoint(path, self.engine, check=False)
        self.step, self.tokens = state["step"], state["tokens"]
        self.loss_sum, self.loss_steps = state["loss_sum"], state["loss_steps"]
        self.val_history = [tuple(v) for v in state["val_history"]]
        self.data.train.load_state_dict(state["data"])
        for stabilizer in self.stabilizers:
            stabilizer.load_state_dict(state["stabilizers"].get(stabilizer.name, {}))
        self.ledger = ledger if ledger is not None else Ledger.from_state(state.get("ledger"))
        self.data.train.skip = SkipList(self.ledger.skip_ranges)
        self.faults.fired = set(self.ledger.faults_fired)
        self.pending_good = list(state.get("pending_good", []))
        self.init_hash, self.first_batch_hash = state.get("init_hash"), state.get("first_batch_hash")
        # (checkpoints written before the RNG states were grouped keep them under two keys)
        set_rng_state(state.get("rng") or {"python": state["rng_python"], "numpy": state["rng_numpy"]})

    # --- the end of the run --------------------------------------------------------------------------------------

    def finish(self, wall_s: float, tokens_per_sec: float, start_step: int, aborted: bool = False) -> dict:
        final_val = self.val_history[-1][1] if self.val_history else None
        summary = {
            "steps": self.step, "tokens": self.tokens,
            "final_val_loss": final_val,
            "best_val_loss": min((v for _, v in self.val_history), default=None),
            "wall_s": wall_s, "tokens_per_sec": tokens_per_sec,
            "resumed_from_step": start_step or None,
            "num_params": self.sizes["num_params"],
            "flops_per_token": self.sizes["flops_per_token"],
            "engine": self.engine.name, "world_size": self.world.world_size,
            "spikes": self.ledger.spikes, "rollbacks": self.ledger.rollbacks,
            "skipped_steps": self.ledger.skipped_steps, "skipped_samples": self.ledger.skipped_samples,
            "lr_cuts": self.ledger.lr_cuts, "moment_resets": self.ledger.moment_resets,
            "aborted": aborted,
            "diverged": aborted or self.diverged_step is not None,
            "diverged_step": self.diverged_step if self.diverged_step is not None else (self.step + 1 if aborted else None),
            "peak_memory_mb": max(self.peak_memory_mb, memory_mb(self.device)),
            "init_hash": self.init_hash, "first_batch_hash": self.first_batch_hash,
            "name": self.cfg.name,
            "run_dir": str(self.run_dir),
        }
        self.log.summary(summary)
        if aborted or self.diverged_step is not None:
            return summary
        self.log.event("end", self.step, final_val_loss=final_val)
        if self.cfg.train.plot and self.world.is_main:
            from llmstable.plot import plot_losses

            plot_losses(self.run_dir)
        if self.cfg.train.sample_tokens > 0:
            model = self.sample_model()  # (a collective for sharded engines)
            if model is not None:
                from llmstable.generate import sample_text

                text = sample_text(model, self.data.tokenizer, "The", self.cfg.train.sample_tokens, seed=0)
                print(f"\n--- sample after {self.step} steps ---\n{text}\n---")
        return summary

    def sample_model(self) -> torch.nn.Module | None:
        """On rank 0, a model to sample from: the trained one, or a whole copy of a sharded one."""
        if self.engine.name in ("single", "ddp"):
            return self.model if self.world.is_main else None
        weights = self.engine.full_state_dict()
        if weights is None:
            return None
        cfg = dataclasses.replace(self.cfg, stabilizer=dataclasses.replace(self.cfg.stabilizer, quant4=None))
        model, _ = build_model_and_stabilizers(cfg, self.data.vocab_size)
        model.load_state_dict(weights)
        return model.to(self.device)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A reduction over a DTensor as a plain tensor over the whole (a collective every rank reaches alike)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
