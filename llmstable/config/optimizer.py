"""The `optimizer` group's schemas (`configs/optimizer/*.yaml`). `name` picks the variant; each variant's extra
fields are the optimizer's own, named as in the official code for drop-in use. A variant registers itself with
`@register("NAME")`, so the loader and the schema keys know it without a hand-kept list."""

from __future__ import annotations

from dataclasses import dataclass
import typing
from typing import Any

from llmstable.config.checks import choice, positive


def register(name: str):
    """Class decorator: make an optimizer schema the variant chosen by `optimizer.name=NAME`."""

    def add(cls: type) -> type:
        OptimizerConfig.variants[name] = cls
        return cls

    return add


@dataclass
class OptimizerConfig:
    """The optimizer and its hyperparameters (`configs/optimizer/*.yaml`). `name` picks the subclass below,
    whose extra fields are the optimizer's own (named as in the official code, for drop-in use)."""

    name: str = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0  # applied to matrices and embeddings only, never to norm weights

    variants: typing.ClassVar[dict[str, type]] = {}  # name -> schema, filled by @register
    # What the optimizer is and needs, as data (llmstable.config.compatibility holds the rules that read it; a
    # variant may make any of them a property of its own fields). Each reason is a phrase for the message.
    whole_tensors: typing.ClassVar[str | None] = None  # why it needs each tensor whole (not shards or partitions)
    tensor_statistics: typing.ClassVar[str | None] = None  # why it needs per-tensor statistics (all-reduced over
    #   shards, so exact there; impossible over flat partitions that mix tensors)
    global_step: typing.ClassVar[str | None] = None  # what its global step drives (wrong when an engine steps the
    #   optimizer one parameter group at a time)
    engine_client: typing.ClassVar[bool] = True  # may be handed to an engine that keeps its own copy of the state
    dtensor_ready: typing.ClassVar[bool] = True  # steps DTensor parameters (FSDP2)
    adam_like: typing.ClassVar[bool] = False  # keeps Adam's second moment as `exp_avg_sq` (the early warning reads it)
    moment_keys: typing.ClassVar[tuple[str, ...]] = ()  # its state's moment tensors (a spike guard reset zeroes them)
    # Hyperparameters counted in optimizer steps. A study's shorter budget runs keep them as they are (they are the
    # optimizer's own, as its paper sets them, not shares of the run); the report lists them. "auto" means the
    # run's own steps.
    step_counts: typing.ClassVar[tuple[str, ...]] = ()

    @classmethod
    def variant(cls, name: Any) -> type | None:
        return cls.variants.get(name)

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


@register("adamw")
@dataclass
class AdamWConfig(OptimizerConfig):
    """torch.optim.AdamW, the baseline."""

    adam_like = True
    moment_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    lr: float = 3e-3
    impl: str = "auto"  # auto (= fused) | fused | foreach | for_loop

    def validate(self, problems: list[str]) -> None:
        super().validate(problems)
        choice(problems, "optimizer.impl", self.impl, ("auto", "fused", "foreach", "for_loop"))


@register("spam")
@dataclass
class SPAMConfig(OptimizerConfig):
    """SPAM (arXiv 2501.06842); defaults as the official code, warmup_steps as the paper (150)."""

    step_counts: typing.ClassVar[tuple[str, ...]] = ("warmup_steps", "DeltaT", "grad_accu_steps")
    global_step = ("its global step (momentum resets, warm-up damping, the clipping schedule) would advance once per "
                   "group")
    adam_like = True
    moment_keys = ("exp_avg", "exp_avg_sq")
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
        choice(problems, "optimizer.compiled", self.compiled, ("auto", True, False))

    @property
    def whole_tensors(self) -> str | None:  # (dense SPAM is elementwise: shards are fine)
        if self.density is None:
            return None
        return f"optimizer.density={self.density} (SPAM's sparse momentum) draws its masks over whole tensors"

    @property
    def engine_client(self) -> bool:
        return self.density is None


@register("stable_spam")
@dataclass
class StableSPAMConfig(OptimizerConfig):
    """Stable-SPAM (arXiv 2502.17055); defaults as the official code, except total_T: auto = the run's steps,
    as the paper's training scripts set it (null turns the cosine damping off, the official default)."""

    step_counts: typing.ClassVar[tuple[str, ...]] = ("total_T", "update_proj_gap")
    tensor_statistics = "its per-tensor statistics (max |g| for AdaClip, ||g|| for AdaGN)"
    global_step = "its global step (the cosine damping, the momentum resets) would advance once per group"
    adam_like = True
    moment_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
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
        choice(problems, "optimizer.compiled", self.compiled, ("auto", True, False))


@register("adamw8bit")
@dataclass
class AdamW8bitConfig(OptimizerConfig):
    """8-bit AdamW, the low-memory baseline: bitsandbytes in one process; torchao's also under FSDP2."""

    engine_client = False  # (DeepSpeed would keep full-precision copies of its 8-bit state)
    name: str = "adamw8bit"
    lr: float = 3e-3
    backend: str = "bitsandbytes"  # bitsandbytes | torchao

    def validate(self, problems: list[str]) -> None:
        super().validate(problems)
        choice(problems, "optimizer.backend", self.backend, ("bitsandbytes", "torchao"))

    @property
    def dtensor_ready(self) -> bool:  # torchao's 8-bit state is DTensor-aware; bitsandbytes fails on DTensors
        return self.backend == "torchao"

    @property
    def moment_keys(self) -> tuple[str, ...]:
        return ("state1", "state2") if self.backend == "bitsandbytes" else ("exp_avg", "exp_avg_sq")


@register("fira")
@dataclass
class FiraConfig(OptimizerConfig):
    """Fira (arXiv 2410.01623): low-rank Adam on the attention and MLP matrices plus a norm-scaled full-rank
    residual with the norm-growth limiter. Class defaults as the official code; lr, rank, update_proj_gap and alpha
    as the official LLaMA-60M pre-training script (130M and 350M use rank 256, 1B rank 512 and alpha 0.0625)."""

    step_counts: typing.ClassVar[tuple[str, ...]] = ("update_proj_gap",)
    whole_tensors = "its projector takes an SVD of each whole gradient matrix"
    moment_keys = ("exp_avg", "exp_avg_sq")
    name: str = "fira"
    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    correct_bias: bool = True
    rank: int = 128  # rank of the projected gradient (clipped to the matrix's shorter side)
    update_proj_gap: int = 200  # steps between SVDs of the gradient
    alpha: float = 0.25  # the scale: multiplies the back-projected update (and the part the residual subtracts)
    proj_type: str = "std"  # std | reverse_std | left | right
    compiled: Any = "auto"  # torch.compile the full-size elementwise work: auto (on CUDA) | true | false

    def validate(self, problems: list[str]) -> None:
        super().validate(problems)
        choice(problems, "optimizer.compiled", self.compiled, ("auto", True, False))
        for key in ("rank", "update_proj_gap"):
            if getattr(self, key) < 1:
                problems.append(f"optimizer.{key}={getattr(self, key)} must be >= 1 (the official scripts use "
                                f"{'rank 128 to 512' if key == 'rank' else 'update_proj_gap 200'})")
        if self.alpha <= 0:
            problems.append(f"optimizer.alpha={self.alpha} must be > 0, e.g. 0.25")
        if self.proj_type == "full":
            problems.append("optimizer.proj_type=full does not work with Fira (the official code fails on it with a "
                            "shape error): use std, reverse_std, left or right")
        else:
            choice(problems, "optimizer.proj_type", self.proj_type, ("std", "reverse_std", "left", "right"))


@register("s3")
@dataclass
class S3Config(OptimizerConfig):
    """SignSoftSGD, S3 (arXiv 2507.06464): one beta for both moments, a p-th order moment in the denominator, a
    memory-free Nesterov numerator; every entry moves by at most lr per step (before weight decay)."""

    moment_keys = ("exp_avg", "exp_avg_pow")
    name: str = "s3"
    beta: float = 0.95  # the one decay of the numerator's and the denominator's moments
    p: float = 3.0  # order of the denominator's moment (2: Adam's second moment)
    nesterov: bool = True
    compiled: Any = "auto"  # torch.compile the per-tensor update: auto (on CUDA) | true | false

    def validate(self, problems: list[str]) -> None:
        super().validate(problems)
        if not 0.0 <= self.beta < 1.0:
            problems.append(f"optimizer.beta={self.beta} must be in [0, 1), e.g. 0.95")
        if self.p < 1:
            problems.append(f"optimizer.p={self.p} must be >= 1, e.g. 3")
        choice(problems, "optimizer.compiled", self.compiled, ("auto", True, False))


@register("muon")
@dataclass
class MuonConfig(OptimizerConfig):
    """Muon (Jordan et al. 2024; Liu et al. 2025, arXiv 2502.16982): torch.optim.Muon on the attention and MLP
    matrices, AdamW (betas, eps) on the embeddings, the LM head and the norms. With adjust_lr_fn match_rms_adamw
    (Liu et al.'s scaling) one lr serves both parts."""

    whole_tensors = "Muon orthogonalizes each whole matrix"
    engine_client = False
    moment_keys = ("momentum_buffer", "exp_avg", "exp_avg_sq")
    name: str = "muon"
    lr: float = 3e-3
    momentum: float = 0.95  # Muon's momentum (Nesterov by default)
    nesterov: bool = True
    ns_steps: int = 5  # Newton-Schulz iterations
    adjust_lr_fn: str = "match_rms_adamw"  # match_rms_adamw (0.2*sqrt(max(A,B))) | original (sqrt(max(1,A/B)))
    ns_dtype: str = "auto"  # Newton-Schulz in: auto (fp32 on CPU, torch's bf16 elsewhere) | bf16 | fp32

    def validate(self, problems: list[str]) -> None:
        super().validate(problems)
        if not 0.0 <= self.momentum < 1.0:
            problems.append(f"optimizer.momentum={self.momentum} must be in [0, 1), e.g. 0.95")
        if not 1 <= self.ns_steps < 100:
            problems.append(f"optimizer.ns_steps={self.ns_steps} must be in [1, 100), e.g. 5")
        choice(problems, "optimizer.adjust_lr_fn", self.adjust_lr_fn, ("match_rms_adamw", "original"))
        choice(problems, "optimizer.ns_dtype", self.ns_dtype, ("auto", "bf16", "fp32"))


@register("lion")
@dataclass
class LionConfig(OptimizerConfig):
    """Lion (Chen et al. 2023, arXiv 2302.06675) from pytorch-optimizer: the sign of an interpolated momentum.
    Its LR is about 3-10x smaller than AdamW's (the paper); betas as the paper (0.9, 0.99); eps unused."""

    moment_keys = ("exp_avg",)
    name: str = "lion"
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)


@register("soap")
@dataclass
class SOAPConfig(OptimizerConfig):
    """SOAP (Vyas et al. 2024, arXiv 2409.11321) from pytorch-optimizer: Adam in the eigenbasis of Shampoo's
    preconditioner, refreshed every precondition_frequency steps; betas as the paper (0.95, 0.95)."""

    step_counts: typing.ClassVar[tuple[str, ...]] = ("precondition_frequency",)
    whole_tensors = "SOAP keeps a preconditioner of each whole matrix"
    engine_client = False
    moment_keys = ("exp_avg", "exp_avg_sq")
    name: str = "soap"
    lr: float = 3e-3
    betas: tuple[float, float] = (0.95, 0.95)
    precondition_frequency: int = 10  # steps between refreshes of the eigenbasis
    max_precondition_dim: int = 1024  # a side longer than this is not rotated (the 4096-row embedding stays Adam)

    def validate(self, problems: list[str]) -> None:
        super().validate(problems)
        for key in ("precondition_frequency", "max_precondition_dim"):
            positive(problems, f"optimizer.{key}", getattr(self, key))


@register("adam_mini")
@dataclass
class AdamMiniConfig(OptimizerConfig):
    """Adam-mini (Zhang et al. 2024, arXiv 2406.16793): one second moment per block. backend=llmstable is the
    authors' official code today (v1.1.1: embedding and LM head per token, query and key per head, value, attention
    output and MLP per output neuron, norms whole); backend=pytorch_optimizer is pytorch-optimizer 4.1's, which keeps
    the old partition (Adam on the embedding and LM head, value, output and MLP matrices whole). lr, betas, eps and
    weight_decay are AdamW's, as the authors' README recommends."""

    whole_tensors = "Adam-mini's blocks (per head, per neuron, per token) are cut from whole tensors"
    engine_client = False
    name: str = "adam_mini"
    lr: float = 3e-3
    backend: str = "llmstable"  # llmstable (official partition) | pytorch_optimizer (4.1, the old partition)
    value_blocks: str = "neuron"  # neuron (official) | whole: the README's advice for runs under 10k-20k steps

    def validate(self, problems: list[str]) -> None:
        super().validate(problems)
        choice(problems, "optimizer.backend", self.backend, ("llmstable", "pytorch_optimizer"))
        choice(problems, "optimizer.value_blocks", self.value_blocks, ("neuron", "whole"))
        if self.backend == "pytorch_optimizer" and self.value_blocks != "neuron":
            problems.append("optimizer.value_blocks=whole needs optimizer.backend=llmstable: pytorch-optimizer's "
                            "Adam-mini already keeps the value matrix as one block")

    @property
    def moment_keys(self) -> tuple[str, ...]:
        return ("m", "vmean") if self.backend == "llmstable" else ("m", "v", "v_mean")
