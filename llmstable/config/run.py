"""The run's own sections: the schedule, the loop, logging, fault injection, the engine, and `TrainConfig`, which
holds one field per group and validates what only the whole config can (values that must fit together)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from llmstable.config.checks import choice, positive
from llmstable.config.compatibility import compatibility_problems
from llmstable.config.engines import ENGINES
from llmstable.config.data import DataConfig
from llmstable.config.loss import CrossEntropyConfig, LossConfig
from llmstable.config.model import ModelConfig
from llmstable.config.optimizer import AdamWConfig, OptimizerConfig
from llmstable.config.stabilizer import StabilizerConfig


@dataclass
class FaultConfig:
    """Fault injection (`configs/fault/*.yaml`), off by default: for tests, demos and rehearsing recovery. Step
    numbers count optimizer steps from 1; each fault fires once, even if a rollback replays its step."""

    loss_scale_steps: list = field(default_factory=list)  # multiply the loss (so the gradients) at these steps
    loss_scale: float = 1000.0
    lr_scale_steps: list = field(default_factory=list)  # multiply the LR at these steps
    lr_scale: float = 100.0
    corrupt_batch_steps: list = field(default_factory=list)  # replace the batch with random tokens
    nan_steps: list = field(default_factory=list)  # make the loss NaN
    kill_at_step: int | None = None  # SIGKILL the process after this step
    kill_in_checkpoint_at_step: int | None = None  # SIGKILL halfway through writing this step's checkpoint
    disk_full_at_step: int | None = None  # raise ENOSPC (disk full) halfway through writing this step's checkpoint
    signal_at_step: int | None = None  # send `signal` to the process itself after this step's update (preemption)
    signal_in_eval_at_step: int | None = None  # send `signal` during the evaluation after this step
    signal: str = "SIGTERM"  # the signal of signal_at_step and signal_in_eval_at_step
    sdc_at_step: int | None = None  # scale one block's activations in one forward pass of this step (a transient fault)
    sdc_layer: int = 0  # the block whose output sdc_at_step scales
    sdc_scale: float = -1000.0  # the factor (a sign and exponent corruption: a clear loss spike through RMSNorm)
    rank: int | None = None  # distributed runs: the one rank that batch, loss, NaN and kill faults hit; null: every rank

    def validate(self, problems: list[str]) -> None:
        for key in ("loss_scale_steps", "lr_scale_steps", "corrupt_batch_steps", "nan_steps"):
            values = getattr(self, key)
            if not all(isinstance(s, int) and s > 0 for s in values):
                problems.append(f"fault.{key}={values} must be a list of step numbers >= 1")
        if self.sdc_at_step is not None and self.sdc_at_step < 1:
            problems.append(f"fault.sdc_at_step={self.sdc_at_step} must be a step number >= 1, or null")
        if self.sdc_layer < 0:
            problems.append(f"fault.sdc_layer={self.sdc_layer} must be >= 0 (a block index)")
        for key in ("kill_at_step", "kill_in_checkpoint_at_step", "disk_full_at_step", "signal_at_step",
                    "signal_in_eval_at_step"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                problems.append(f"fault.{key}={value!r} must be a step number >= 1, or null")
        choice(problems, "fault.signal", self.signal, ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"))

    def active(self) -> bool:
        return any([self.loss_scale_steps, self.lr_scale_steps, self.corrupt_batch_steps, self.nan_steps,
                    self.kill_at_step, self.kill_in_checkpoint_at_step, self.disk_full_at_step, self.sdc_at_step,
                    self.signal_at_step, self.signal_in_eval_at_step])


@dataclass
class DistributedConfig:
    """How the run is spread over processes (`configs/distributed/*.yaml`; see `llmstable.parallel`).

    `single` is one process. `ddp` and `fsdp2` are started with `torchrun` (or any launcher that sets RANK and
    WORLD_SIZE); `deepspeed` with the `deepspeed` launcher or `torchrun`. Started without a launcher, ddp, fsdp2
    and deepspeed run as a world of one process, which trains and checkpoints exactly as the engine would.
    """

    name: str = "single"  # single | ddp | fsdp2 | deepspeed (or an engine registered in llmstable.config.engines)
    backend: str = "auto"  # process-group backend: auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    timeout_s: int = 600  # how long a collective waits for a rank that died or hangs before the job fails
    param_dtype: str = "fp32"  # fsdp2: dtype of the gathered parameters in forward/backward (fp32 | bf16)
    reduce_dtype: str = "fp32"  # fsdp2: dtype gradients are reduce-scattered in (fp32 | bf16)
    reshard_after_forward: bool = True  # fsdp2: free gathered parameters after forward (less memory, more comms)
    zero_stage: int = 2  # deepspeed: ZeRO stage 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ weights)
    deepspeed_config: str | None = None  # deepspeed: a JSON file whose keys override the generated config

    def validate(self, problems: list[str]) -> None:
        choice(problems, "distributed.name", self.name, tuple(ENGINES))
        choice(problems, "distributed.backend", self.backend, ("auto", "gloo", "nccl"))
        choice(problems, "distributed.param_dtype", self.param_dtype, ("fp32", "bf16"))
        choice(problems, "distributed.reduce_dtype", self.reduce_dtype, ("fp32", "bf16"))
        positive(problems, "distributed.timeout_s", self.timeout_s)
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"distributed.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.deepspeed_config is not None:
            from pathlib import Path

            readers = [n for n, t in ENGINES.items() if t.config_file_key == "deepspeed_config"]
            if self.name not in readers:
                problems.append(f"distributed.deepspeed_config is set but distributed.name={self.name!r}, which does "
                                f"not read it: use distributed={' or distributed='.join(readers)}, or set "
                                "distributed.deepspeed_config=null")
            elif not Path(self.deepspeed_config).is_file():
                problems.append(f"distributed.deepspeed_config={self.deepspeed_config!r} is not a file: point it at "
                                "a DeepSpeed JSON, or null to use the generated config")


@dataclass
class ScheduleConfig:
    """The learning-rate schedule (`configs/schedule/*.yaml`); see `llmstable.schedule`."""

    name: str = "cosine"  # cosine | linear | constant | wsd
    warmup_steps: int = 50  # linear warm-up from 0
    min_lr_ratio: float = 0.1  # the floor the decay ends at, as a fraction of optimizer.lr
    decay_fraction: float = 0.2  # wsd only: the share of steps spent in the final decay
    warmup_fraction: float | None = None  # the warm-up as a share of the run's steps; when set, warmup_steps is unused

    def validate(self, problems: list[str]) -> None:
        choice(problems, "schedule.name", self.name, ("cosine", "linear", "constant", "wsd"))
        if self.warmup_steps < 0:
            problems.append(f"schedule.warmup_steps={self.warmup_steps} must be >= 0")
        if self.warmup_fraction is not None and not 0.0 <= self.warmup_fraction < 1.0:
            problems.append(f"schedule.warmup_fraction={self.warmup_fraction} must be in [0, 1), e.g. 0.1, or null "
                            "to use schedule.warmup_steps")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"schedule.min_lr_ratio={self.min_lr_ratio} must be in [0, 1], e.g. 0.1")
        if not 0.0 < self.decay_fraction <= 1.0:
            problems.append(f"schedule.decay_fraction={self.decay_fraction} must be in (0, 1], e.g. 0.2")


@dataclass
class TrainLoopConfig:
    """Batch, budget, precision and the intervals of the loop."""

    global_batch_size: int = 32  # sequences per optimizer step
    micro_batch_size: int = 16  # sequences per forward/backward; global / micro = accumulation steps
    budget_tokens: int | None = 2_000_000  # exactly one of budget_tokens and max_steps
    max_steps: int | None = None
    max_norm: float | None = 1.0  # global gradient-norm clip; null disables clipping
    seed: int = 0
    deterministic: bool = False  # deterministic kernels (torch.use_deterministic_algorithms): bit-exact GPU resumes, SDC replays
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: Any = "auto"  # torch.compile the model: auto (on CUDA; eager on CPU, measured faster there) | true | false
    log_interval: int = 10  # steps between metrics.jsonl rows
    eval_interval: int = 100  # steps between validation passes (and one at the end)
    eval_samples: int = 128  # held-out blocks per validation pass (the same ones every time)
    checkpoint_interval: int = 200  # steps between checkpoints (and one at the end); 0 for the end only
    keep_checkpoints: int = 3  # newest checkpoints kept on disk
    checkpoint_async: bool = True  # the loop only snapshots the state to CPU memory; a background thread writes it
    preempt_signals: list = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # checkpoint and exit 75 on these
    progress: bool = True  # show the progress bar
    sample_tokens: int = 80  # > 0: print a generated sample of this many tokens at the end
    plot: bool = True  # write loss.png into the run directory at the end
    init_from: str | None = None  # a .safetensors of initial weights (the compare command's shared init)

    def validate(self, problems: list[str]) -> None:
        for key in ("global_batch_size", "micro_batch_size", "log_interval", "eval_interval", "eval_samples",
                    "keep_checkpoints"):
            positive(problems, f"train.{key}", getattr(self, key))
        if self.micro_batch_size > 0 and self.global_batch_size % self.micro_batch_size:
            problems.append(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"train.micro_batch_size={self.micro_batch_size}: pick a micro batch among "
                f"{[d for d in range(1, self.global_batch_size + 1) if self.global_batch_size % d == 0]}"
            )
        if self.budget_tokens is None and self.max_steps is None:
            problems.append("neither train.budget_tokens nor train.max_steps is set: set one of them, e.g. "
                            "train.budget_tokens=2000000 or train.max_steps=1000")
        elif self.budget_tokens is not None and self.max_steps is not None:
            problems.append(
                f"train.budget_tokens={self.budget_tokens} and train.max_steps={self.max_steps} are both set: keep "
                "one and null the other, e.g. train.max_steps=null (or train.budget_tokens=null)"
            )
        for key in ("budget_tokens", "max_steps"):
            if getattr(self, key) is not None:
                positive(problems, f"train.{key}", getattr(self, key))
        if self.max_norm is not None and self.max_norm <= 0:
            problems.append(f"train.max_norm={self.max_norm} must be > 0, or null to disable clipping")
        if self.checkpoint_interval < 0:
            problems.append(f"train.checkpoint_interval={self.checkpoint_interval} must be >= 0")
        choice(problems, "train.precision", self.precision, ("auto", "fp32", "bf16"))
        choice(problems, "train.compile", self.compile, ("auto", True, False))
        for name in self.preempt_signals if isinstance(self.preempt_signals, list) else [self.preempt_signals]:
            choice(problems, "train.preempt_signals[]", name, ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP"))
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            problems.append(f"train.device={self.device!r} must be auto, cpu, cuda or cuda:N")


@dataclass
class LoggingConfig:
    """Optional metric sinks besides metrics.jsonl, which is always written."""

    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "llmstable"
    tensorboard: bool = False

    def validate(self, problems: list[str]) -> None:
        choice(problems, "logging.wandb", self.wandb, ("disabled", "offline", "online"))


@dataclass
class TrainConfig:
    """The whole run: one field per config group, plus where it writes and whether it resumes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=AdamWConfig)
    stabilizer: StabilizerConfig = field(default_factory=StabilizerConfig)
    loss: LossConfig = field(default_factory=CrossEntropyConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    name: str | None = None  # a label for the run (compare arms set it)
    lr_grid: list | None = None  # the arm's LR grid `llmstable compare` sweeps (configs/arm/); training ignores it
    tune: dict | None = None  # one more key the arm is tuned over, {key: [values]} (configs/arm/); training ignores it
    run_dir: str | None = None  # null: Hydra's output directory
    resume: str = "auto"  # auto (newest valid checkpoint in run_dir, if any) | never | a checkpoint path
    resume_force: bool = False  # resume even if the config changed in ways that break the run (model, data, ...)
    resume_trust: bool = False  # resume a DCP / DeepSpeed checkpoint written under another account (unpickles it)
    run_dir_overwrite: bool = False  # with resume=never: move an earlier run in run_dir aside (deletes nothing)

    def validate(self, problems: list[str]) -> None:
        if self.run_dir_overwrite and self.resume != "never":
            problems.append(f"run_dir_overwrite=true starts the run over, but resume={self.resume!r}: add "
                            "resume=never to start over (the earlier run is moved aside), or drop run_dir_overwrite")
        for group in (self.model, self.data, self.optimizer, self.schedule, self.train, self.logging,
                      self.stabilizer, self.loss, self.fault, self.distributed):
            group.validate(problems)
        self.validate_distributed(problems)
        self.validate_ranks(problems)
        quant, m = self.stabilizer.quant4, self.model
        if quant is not None and m.n_heads > 0:
            kv_dim = (m.n_kv_heads or m.n_heads) * (m.dim // m.n_heads)
            sizes = {"model.dim * model.dim": m.dim * m.dim, "model.dim * kv heads * head dim": m.dim * kv_dim,
                     "model.dim * model.intermediate_size": m.dim * m.intermediate_size}
            for key, size in sizes.items():
                if size % quant.group_size:
                    problems.append(
                        f"stabilizer.quant4.group_size={quant.group_size} does not divide the {size} weights of a "
                        f"layer ({key}): choose a group size that divides {math.gcd(*sizes.values())}"
                    )
        if self.fault.sdc_at_step is not None and self.fault.sdc_layer >= self.model.n_layers:
            problems.append(f"fault.sdc_layer={self.fault.sdc_layer} is not a block of a {self.model.n_layers}-layer "
                            f"model: choose 0 to {self.model.n_layers - 1}")
        if self.data.seq_len > self.model.max_seq_len:
            problems.append(
                f"data.seq_len={self.data.seq_len} is longer than model.max_seq_len={self.model.max_seq_len}: "
                f"lower data.seq_len or raise model.max_seq_len"
            )
        if self.run_dir is None:
            problems.append("run_dir is not set: pass run_dir=PATH (the CLI uses Hydra's output directory)")
        guard, t = self.stabilizer.spike_guard, self.train
        if guard is not None and t.checkpoint_interval and t.keep_checkpoints * t.checkpoint_interval <= guard.good_after_steps:
            problems.append(
                f"train.keep_checkpoints={t.keep_checkpoints} x train.checkpoint_interval={t.checkpoint_interval} must "
                f"exceed stabilizer.spike_guard.good_after_steps={guard.good_after_steps}, or every checkpoint is "
                "pruned before it can become good and rollbacks go back to the start: keep more checkpoints, "
                "checkpoint less often, or lower good_after_steps"
            )

    def validate_ranks(self, problems: list[str], ranks: int | None = None) -> None:
        """Every rank of the launch (`ranks`, by default the launcher's WORLD_SIZE) needs whole micro-batches of
        every global batch."""
        ranks, t = ranks or int(os.environ.get("WORLD_SIZE", "1") or 1), self.train
        per_step = t.micro_batch_size * ranks
        if ranks > 1 and t.micro_batch_size > 0 and t.global_batch_size % per_step:
            problems.append(
                f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
                f"{t.micro_batch_size} x {ranks} ranks = {per_step}: every rank needs whole micro-batches; lower "
                "train.micro_batch_size or change the global batch")

    def validate_distributed(self, problems: list[str]) -> None:
        """What cannot work on the chosen engine, from what the engine, the optimizer and the stabilizers declare
        (llmstable.config.compatibility; the README's backend x feature table, as errors)."""
        compatibility_problems(self, problems)

    @property
    def grad_accum_steps(self) -> int:
        return self.train.global_batch_size // self.train.micro_batch_size

    @property
    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.data.seq_len

    @property
    def total_steps(self) -> int:
        if self.train.max_steps is not None:
            return self.train.max_steps
        return -(-self.train.budget_tokens // self.tokens_per_step)  # ceil
