"""The `loss` group's schemas (`configs/loss/*.yaml`): the training loss that replaces the softmax cross-entropy,
or the cross-entropy itself (the default). `name` picks the variant; each variant carries its paper's defaults and
declares, as data read without torch, what its logits mean: the distribution sampling draws from, whether its own
loss is that distribution's NLL, what the export says about them, and the function that computes it (`target`,
imported when a run builds its loss). A variant registers itself with `@register_loss("NAME")`."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any


def register_loss(name: str):
    """Class decorator: make a loss schema the variant chosen by `loss=NAME`."""

    def add(cls: type) -> type:
        LossConfig.variants[name] = cls
        return cls

    return add


@dataclass
class LossConfig:
    """The training loss. `cross_entropy` is the softmax cross-entropy; the other variants replace it."""

    name: str = "cross_entropy"

    variants: typing.ClassVar[dict[str, type]] = {}  # name -> schema
    target: typing.ClassVar[str] = "llmstable.losses:cross_entropy"  # (logits, targets, **kwargs()) -> loss
    replaces_cross_entropy: typing.ClassVar[bool] = True  # trains on another loss than the softmax cross-entropy
    samples_from: typing.ClassVar[str] = "softmax"  # the distribution the logits define: softmax | stablemax
    own_nll: typing.ClassVar[bool] = False  # its loss is the NLL of that distribution (else val/softmax_ce is)
    logits_mean: typing.ClassVar[str] = "softmax logits: p = softmax(logits)"  # what its logits are, in words

    @classmethod
    def variant(cls, name: Any) -> type | None:
        return cls.variants.get(name)

    def validate(self, problems: list[str]) -> None:
        pass

    def kwargs(self) -> dict:
        """The loss function's arguments besides (logits, targets)."""
        return {}

    def export_note(self) -> str:
        """What an exported model's logits mean, for LOGITS.md (a loss that replaces the cross-entropy)."""
        return (f"# These logits were trained with loss={self.name}\n\n{self.logits_mean}. transformers applies a "
                "softmax to them; the model's softmax cross-entropy is reported in validation as val/softmax_ce.\n")


@register_loss("cross_entropy")
@dataclass
class CrossEntropyConfig(LossConfig):
    """The softmax cross-entropy, in fp32 (the default)."""

    replaces_cross_entropy = False
    own_nll = True
    name: str = "cross_entropy"


@register_loss("stablemax")
@dataclass
class StableMaxConfig(LossConfig):
    """StableMax cross-entropy (Prieto et al. 2025, arXiv 2501.04697): s(x) = x + 1 for x >= 0, 1/(1 - x + eps)
    for x < 0, p = s(x) / sum s(x), computed in float64 as the official code does."""

    target = "llmstable.losses:stablemax_cross_entropy"
    samples_from = "stablemax"
    own_nll = True
    logits_mean = ("StableMax scores: p_i = s(x_i) / sum_j s(x_j), s(x) = x + 1 for x >= 0 and 1 / (1 - x) for "
                   "x < 0 (arXiv 2501.04697); a softmax over them is NOT the distribution the model was trained for")
    name: str = "stablemax"
    eps: float = 1e-30  # the official code's epsilon in the x < 0 branch

    def validate(self, problems: list[str]) -> None:
        if not 0 <= self.eps < 1e-3:
            problems.append(f"loss.eps={self.eps} must be in [0, 1e-3): it only guards the x < 0 branch of "
                            "s(x); the official value is 1e-30")

    def kwargs(self) -> dict:
        return {"eps": self.eps}

    def export_note(self) -> str:
        return ("# These logits are StableMax scores\n\n"
                f"This model was trained with loss=stablemax: {self.logits_mean}.\n\n"
                "transformers applies a softmax to them (generate, pipelines, perplexity), which is a different "
                "distribution: the most likely token is the same (both are increasing in the score, so greedy "
                "decoding and top-k sets agree), but sampled text and probabilities are not what the model was "
                "trained for, and a softmax perplexity of this model means little. Sample with `llmstable generate` "
                "(StableMax), or apply p = s(x) / sum s(x) to the logits yourself.\n")


@register_loss("spherical_z")
@dataclass
class SphericalZConfig(LossConfig):
    """Spherical Z-loss (de Brebisson and Vincent 2016, arXiv 1604.08859): z = (o - mean(o)) / std(o) per position,
    loss = softplus(a * (b - z_target)) / a."""

    target = "llmstable.losses:spherical_z_loss"
    logits_mean = ("logits trained with the spherical Z-loss (arXiv 1604.08859), which defines no distribution; "
                   "they are read as softmax logits")
    name: str = "spherical_z"
    a: float = 0.1  # sharpness of the softplus
    b: float = 10.0  # where the softplus bends, in standard deviations of the position's logits

    def validate(self, problems: list[str]) -> None:
        if not self.a > 0:
            problems.append(f"loss.a={self.a} must be > 0, e.g. 0.1")

    def kwargs(self) -> dict:
        return {"a": self.a, "b": self.b}
