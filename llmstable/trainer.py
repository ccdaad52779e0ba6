"""The training loop. `train(cfg) -> summary` is what the CLI, the tests and the benchmarks call.

Build first, then run: `build_trainer` constructs every part with small builders; `Trainer.__init__` only
assigns; `Trainer.fit` runs the loop, which reads straight down:
  1. set the learning rate;
  2. forward and loss for each micro-batch, then backward;
  3. clip, then the optimizer step;
  4. log, evaluate and checkpoint at their intervals.
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from llmstable import checkpoint as ckpt
from llmstable.config import ConfigError, TrainConfig, to_dict
from llmstable.data import DataBundle, build_data
from llmstable.metrics import RunLog
from llmstable.model import Llama
from llmstable.optimizers import build_optimizer
from llmstable.schedule import lr_factor
from llmstable.stabilizers import Stabilizer, build_model_and_stabilizers


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) the run described by cfg; returns the summary also written to summary.json."""
    trainer = build_trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.log.close()


# --- builders --------------------------------------------------------------------------------------------------


def build_trainer(cfg: TrainConfig) -> Trainer:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    data = build_data(cfg.data, cfg.train.seed, min_train_blocks=cfg.train.global_batch_size)
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < data.vocab_size:
        raise ConfigError([
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {data.vocab_size} ids: "
            f"set model.vocab_size={data.vocab_size} or null (take the tokenizer's size)"
        ])
    torch.manual_seed(cfg.train.seed)  # the initial weights depend on the seed alone, not on data loading
    model, stabilizers = build_model_and_stabilizers(cfg, data.vocab_size, device)
    optimizer = build_optimizer(cfg.optimizer, model, device, cfg.total_steps)
    log = RunLog(run_dir, cfg.logging, to_dict(cfg))
    return Trainer(cfg, model, optimizer, stabilizers, data, log, device, run_dir)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError([f"train.device={name!r} but no CUDA device is available: use train.device=cpu or auto"])
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CUDA (precision auto or bf16); plain fp32 otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# --- the trainer -----------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: TrainConfig, model: Llama, optimizer: torch.optim.Optimizer,
                 stabilizers: list[Stabilizer], data: DataBundle, log: RunLog, device: torch.device, run_dir: Path):
        self.cfg, self.model, self.optimizer, self.stabilizers, self.data = cfg, model, optimizer, stabilizers, data
        self.log, self.device, self.run_dir = log, device, run_dir
        self.forward = torch.compile(model) if cfg.train.compile else model
        self.step = 0
        self.tokens = 0
        self.loss_sum = 0.0  # train loss summed over the steps since the last metrics row
        self.loss_steps = 0
        self.val_history: list[tuple[int, float]] = []

    # --- the loop ----------------------------------------------------------------------------------------------

    def fit(self) -> dict:
        cfg, train_cfg = self.cfg, self.cfg.train
        self.prepare_run_dir()
        total = cfg.total_steps
        flops_per_token = self.model.flops_per_token(cfg.data.seq_len)
        start_step, start_tokens, t_start = self.step, self.tokens, time.perf_counter()
        bar = tqdm(total=total, initial=self.step, disable=not train_cfg.progress, unit="step", dynamic_ncols=True)
        t_log, tokens_log = time.perf_counter(), self.tokens
        while self.step < total:
            lr = cfg.optimizer.lr * lr_factor(self.step, total, cfg.schedule)
            loss, grad_norm = self.train_step(lr)
            self.step += 1
            for event in getattr(self.optimizer, "pop_events", list)():
                self.log.event(event.pop("event"), self.step, **event)
            self.tokens += cfg.tokens_per_step
            self.loss_sum += loss.item()  # host sync: one scalar per step, for the logged mean
            self.loss_steps += 1
            bar.update(1)
            last = self.step == total
            if self.step % train_cfg.log_interval == 0 or last:
                now = time.perf_counter()
                tokens_per_sec = (self.tokens - tokens_log) / max(now - t_log, 1e-9)
                row = {
                    "step": self.step, "tokens": self.tokens,
                    "train/loss": self.loss_sum / self.loss_steps,
                    "optim/lr": lr,
                    "optim/grad_norm": grad_norm.item(),  # host sync, once per logged step
                    "perf/tokens_per_sec": tokens_per_sec,
                    "perf/flops_per_sec": tokens_per_sec * flops_per_token,
                    **self.plugin_metrics(),
                }
                self.log.metrics(row)
                bar.set_postfix(loss=f"{row['train/loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}")
                self.loss_sum, self.loss_steps = 0.0, 0
                t_log, tokens_log = now, self.tokens
            if self.step % train_cfg.eval_interval == 0 or last:
                self.evaluate()
            if (train_cfg.checkpoint_interval and self.step % train_cfg.checkpoint_interval == 0) or last:
                self.save()
        bar.close()
        wall_s = time.perf_counter() - t_start
        return self.finish(wall_s, (self.tokens - start_tokens) / max(wall_s, 1e-9), start_step)

    def train_step(self, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer update at learning rate lr: forward/backward over the micro-batches, clip, step.
        Returns (mean loss, pre-clip gradient norm) as device tensors; nothing here syncs with the host."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.forward_backward()
        max_norm = self.cfg.train.max_norm if self.cfg.train.max_norm is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def forward_backward(self) -> torch.Tensor:
        """Forward and backward over the accumulation micro-batches; returns the step's mean loss (a device
        tensor, not yet synced)."""
        accum = self.cfg.grad_accum_steps
        total = torch.zeros((), device=self.device)
        for _ in range(accum):
            batch, _ = self.data.train.next_batch(self.cfg.train.micro_batch_size)
            batch = batch.to(self.device, non_blocking=True)
            with autocast_for(self.device, self.cfg.train.precision):
                logits = self.forward(batch[:, :-1])
                ce = cross_entropy(logits, batch[:, 1:])
                loss = ce
                for stabilizer in self.stabilizers:
                    loss = stabilizer.on_loss(logits, loss)
            (loss / accum).backward()
            total += ce.detach() / accum  # train/loss is the cross-entropy alone; auxiliary terms log apart
        return total

    def plugin_metrics(self) -> dict[str, float]:
        """Metrics of the stabilizers and of the optimizer, if it reports any (`stab/<name>/...`)."""
        out: dict[str, float] = {}
        for stabilizer in self.stabilizers:
            out.update(stabilizer.metrics())
        out.update(getattr(self.optimizer, "metrics", dict)())
        return out

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first eval_samples validation blocks (the same blocks at every evaluation)."""
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

    # --- run directory, checkpoints, resume ---------------------------------------------------------------------

    def prepare_run_dir(self) -> None:
        """Write config.yaml and the tokenizer, and resume from a checkpoint if the config says so."""
        config_yaml = OmegaConf.to_yaml(to_dict(self.cfg))
        (self.run_dir / "config.yaml").write_text(config_yaml)
        if not (self.run_dir / "tokenizer").exists():
            self.data.tokenizer.save_pretrained(str(self.run_dir / "tokenizer"))
        path = self.resume_path()
        if path is not None:
            self.restore(path)
            self.log.event("resume", self.step, checkpoint=str(path), tokens=self.tokens)
        else:
            self.log.event("start", 0, num_params=self.model.num_params(), total_steps=self.cfg.total_steps)

    def resume_path(self) -> Path | None:
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume == "auto":
            return ckpt.latest_valid(self.run_dir / "checkpoints")
        path = Path(self.cfg.resume)
        if not path.is_dir():
            raise ConfigError([f"resume={self.cfg.resume!r} is not a checkpoint directory: use auto, never, or a "
                               "path such as RUN_DIR/checkpoints/step_00000100"])
        return path

    def trainer_state(self) -> dict:
        return {
            "step": self.step, "tokens": self.tokens,
            "loss_sum": self.loss_sum, "loss_steps": self.loss_steps,
            "val_history": self.val_history,
            "data": self.data.train.state_dict(),
            "stabilizers": {s.name: s.state_dict() for s in self.stabilizers},
            "rng_python": _jsonable(random.getstate()),
            "rng_numpy": _jsonable(np.random.get_state()),
        }

    def save(self) -> Path:
        path = ckpt.save_checkpoint(
            self.run_dir / "checkpoints", self.step, self.model, self.optimizer, self.trainer_state(),
            OmegaConf.to_yaml(to_dict(self.cfg)), keep=self.cfg.train.keep_checkpoints,
        )
        self.log.event("checkpoint", self.step, path=str(path), tokens=self.tokens)
        return path

    def restore(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.step, self.tokens = state["step"], state["tokens"]
        self.loss_sum, self.loss_steps = state["loss_sum"], state["loss_steps"]
        self.val_history = [tuple(v) for v in state["val_history"]]
        self.data.train.load_state_dict(state["data"])
        for stabilizer in self.stabilizers:
            stabilizer.load_state_dict(state["stabilizers"].get(stabilizer.name, {}))
        random.setstate(_python_rng(state["rng_python"]))
        np.random.set_state(_numpy_rng(state["rng_numpy"]))

    # --- the end of the run --------------------------------------------------------------------------------------

    def finish(self, wall_s: float, tokens_per_sec: float, start_step: int) -> dict:
        final_val = self.val_history[-1][1] if self.val_history else None
        summary = {
            "steps": self.step, "tokens": self.tokens,
            "final_val_loss": final_val,
            "best_val_loss": min((v for _, v in self.val_history), default=None),
            "wall_s": wall_s, "tokens_per_sec": tokens_per_sec,
            "resumed_from_step": start_step or None,
            "num_params": self.model.num_params(),
            "flops_per_token": self.model.flops_per_token(self.cfg.data.seq_len),
            "run_dir": str(self.run_dir),
        }
        self.log.summary(summary)
        self.log.event("end", self.step, final_val_loss=final_val)
        if self.cfg.train.plot:
            from llmstable.plot import plot_losses

            plot_losses(self.run_dir)
        if self.cfg.train.sample_tokens > 0:
            from llmstable.generate import sample_text

            text = sample_text(self.model, self.data.tokenizer, "The", self.cfg.train.sample_tokens, seed=0)
            print(f"\n--- sample after {self.step} steps ---\n{text}\n---")
        return summary


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _python_rng(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss


def _numpy_rng(state: list) -> tuple:
    kind, keys, pos, has_gauss, cached = state
    return kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached
