"""The `stabilizer` group's schemas (`configs/stabilizer/*.yaml`): any subset, each absent (None) unless chosen."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field


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

    whole_params_in_forward: typing.ClassVar[bool] = True  # it quantizes each whole weight as forward reads it
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

    # What is watched: loss and grad_norm are checked for spikes every step; precond (the share of coordinates whose
    # g^2 < precond_rho * v_hat, logged steps) and precond_curvature (Bai et al.'s predictor, every
    # curvature_interval steps) give early warnings (`spike_warning` events) instead (arXiv 2506.04805).
    watch: list = field(default_factory=lambda: ["loss", "grad_norm"])
    metrics: list | None = None  # the former name of watch, still read (configs and checkpoints written before)
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
    ring_size: int = 2  # checkpoints also kept in CPU memory, so a rollback to one reads nothing from disk (0: none)
    precond_rho: float = 0.01  # precond: a coordinate is stale when g^2 < precond_rho * v_hat
    precond_frac: float = 0.5  # precond: warn when the stale share of any block exceeds this
    curvature_interval: int = 100  # precond_curvature: steps between Hessian-vector products
    warn_lr_factor: float = 1.0  # on a warning, multiply the LR by this for warn_lr_steps steps (1.0: only log)
    warn_lr_steps: int = 10
    replay: bool = False  # recompute a spiky step from the same state before acting (silent-data-corruption check)
    max_sdc: int = 3  # stop (exit code 4) at this many replays that did not reproduce

    def __post_init__(self) -> None:
        if self.metrics is not None:  # the former name: it set the spike metrics, so it stands in for those
            self.watch = [*self.metrics, *(m for m in self.watch if m not in ("loss", "grad_norm"))]
            self.metrics = None

    def validate(self, problems: list[str]) -> None:
        for metric in self.watch:
            if metric not in WATCHABLE:
                problems.append(f"stabilizer.spike_guard.watch has {metric!r}; allowed: {', '.join(WATCHABLE)}")
        if not self.spike_metrics():
            problems.append(f"stabilizer.spike_guard.watch={self.watch} watches neither loss nor grad_norm: add one, "
                            "e.g. watch=[loss,grad_norm,precond]")
        for key in ("precond_rho", "curvature_interval", "warn_lr_steps", "max_sdc"):
            if not getattr(self, key) > 0:
                problems.append(f"stabilizer.spike_guard.{key}={getattr(self, key)} must be > 0")
        if not 0 < self.precond_frac < 1:
            problems.append(f"stabilizer.spike_guard.precond_frac={self.precond_frac} must be in (0, 1), e.g. 0.5")
        if not 0 < self.warn_lr_factor <= 1:
            problems.append(f"stabilizer.spike_guard.warn_lr_factor={self.warn_lr_factor} must be in (0, 1]; 1.0 "
                            "only logs the warning")
        for key in ("window", "min_history", "good_after_steps"):
            if getattr(self, key) <= 0:
                problems.append(f"stabilizer.spike_guard.{key}={getattr(self, key)} must be > 0")
        for key in ("skip_steps", "margin_steps", "lr_cut_after", "moment_reset_after", "max_rollbacks", "ring_size"):
            if getattr(self, key) < 0:
                problems.append(f"stabilizer.spike_guard.{key}={getattr(self, key)} must be >= 0")
        if self.k_std <= 0 or self.ema_ratio <= 1:
            problems.append(f"stabilizer.spike_guard: k_std={self.k_std} must be > 0 and "
                            f"ema_ratio={self.ema_ratio} > 1")
        if not 0 < self.lr_cut_factor < 1:
            problems.append(f"stabilizer.spike_guard.lr_cut_factor={self.lr_cut_factor} must be in (0, 1), e.g. 0.5")
        if self.min_history > self.window:
            problems.append(f"stabilizer.spike_guard.min_history={self.min_history} must be <= window={self.window}")

    def spike_metrics(self) -> list[str]:
        """The watched metrics that are checked for spikes every step (the others give early warnings)."""
        return [m for m in self.watch if m in ("loss", "grad_norm")]



WATCHABLE = ("loss", "grad_norm", "precond", "precond_curvature")


@dataclass
class SoftmaxCollapseConfig:
    """The softmax-collapse monitor (Prieto et al. 2025, arXiv 2501.04697): the share of positions whose fp32
    softmax probability of the target is exactly 1 (so the target's gradient component is exactly 0; the others
    are tiny, not 0), at logged steps."""

    enabled: bool = True

    def validate(self, problems: list[str]) -> None:
        pass


@dataclass
class NormGrowthLimiterConfig:
    """Fira's norm-growth limiter on every gradient (arXiv 2410.01623): per tensor, ||g_t|| <= gamma ||g_{t-1}||."""

    step_hooks: typing.ClassVar[bool] = True  # acts between the gradients and the update, or right after it

    gamma: float = 1.01

    def validate(self, problems: list[str]) -> None:
        if not self.gamma >= 1.0:
            problems.append(f"stabilizer.norm_growth_limiter.gamma={self.gamma} must be >= 1, e.g. 1.01")


@dataclass
class OrthoGradConfig:
    """OrthoGrad (Prieto et al. 2025, arXiv 2501.04697): each gradient projected orthogonal to its weight, then
    rescaled to its own norm."""

    step_hooks: typing.ClassVar[bool] = True  # acts between the gradients and the update, or right after it

    enabled: bool = True

    def validate(self, problems: list[str]) -> None:
        pass


@dataclass
class EmbGradShrinkConfig:
    """Embedding-gradient shrink (GLM-130B, arXiv 2210.02414): the embedding output's gradient times alpha, with
    the forward values unchanged."""

    alpha: float = 0.1

    def validate(self, problems: list[str]) -> None:
        if not 0.0 < self.alpha <= 1.0:
            problems.append(f"stabilizer.emb_grad_shrink.alpha={self.alpha} must be in (0, 1], e.g. 0.1")


@dataclass
class UpdateClipConfig:
    """Update clipping (anchors: Levanter's clip_update_norm and update-RMS clipping, marin#1368): per tensor, an
    update whose RMS exceeds k times the mean of its last `window` update RMS values is scaled down to it."""

    step_hooks: typing.ClassVar[bool] = True  # acts between the gradients and the update, or right after it

    k: float = 2.0
    window: int = 128  # Levanter's rolling_interval_length in Marin's 32B runs
    min_history: int = 16  # updates in the window before anything is clipped

    def validate(self, problems: list[str]) -> None:
        if not self.k > 1.0:
            problems.append(f"stabilizer.update_clip.k={self.k} must be > 1, e.g. 2.0")
        if self.window <= 0:
            problems.append(f"stabilizer.update_clip.window={self.window} must be > 0, e.g. 128")
        if not 0 < self.min_history <= max(self.window, 1):
            problems.append(f"stabilizer.update_clip.min_history={self.min_history} must be in [1, window="
                            f"{self.window}], e.g. 16")


@dataclass
class QKClipConfig:
    """QK-clip (MuonClip, Kimi K2, arXiv 2507.20534): a head whose largest attention logit of the step exceeds tau
    gets its W_q and W_k rows scaled by (tau / max)^alpha and (tau / max)^(1 - alpha) after the update."""

    step_hooks: typing.ClassVar[bool] = True  # acts between the gradients and the update, or right after it

    tau: float = 100.0
    alpha: float = 0.5  # the share of the rescale given to W_q
    interval: int = 1  # measure and clip every interval-th update

    def validate(self, problems: list[str]) -> None:
        if not self.tau > 0:
            problems.append(f"stabilizer.qk_clip.tau={self.tau} must be > 0, e.g. 100")
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"stabilizer.qk_clip.alpha={self.alpha} must be in [0, 1], e.g. 0.5")
        if self.interval < 1:
            problems.append(f"stabilizer.qk_clip.interval={self.interval} must be >= 1")


@dataclass
class StabilizerConfig:
    """The `stabilizer` group: any subset, e.g. stabilizer=[zloss,qk_norm,quant4,spike_guard]. Absent is off."""

    zloss: ZLossConfig | None = None
    qk_norm: QKNormConfig | None = None
    quant4: Quant4Config | None = None
    spike_guard: SpikeGuardConfig | None = None
    orthograd: OrthoGradConfig | None = None  # (in the order the gradient hooks act: OrthoGrad, then the limiter)
    norm_growth_limiter: NormGrowthLimiterConfig | None = None
    emb_grad_shrink: EmbGradShrinkConfig | None = None
    softmax_collapse: SoftmaxCollapseConfig | None = None
    update_clip: UpdateClipConfig | None = None
    qk_clip: QKClipConfig | None = None

    def validate(self, problems: list[str]) -> None:
        for name in self.active():
            getattr(self, name).validate(problems)
        if self.qk_clip is not None and self.qk_norm is not None:
            problems.append("stabilizer=[qk_norm,qk_clip]: QK-clip rescales W_q and W_k, which changes nothing after "
                            "QK-norm's RMSNorm (and QK-norm already bounds the logits); choose one of them")

    def active(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
