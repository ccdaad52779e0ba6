"""The `loss` group's schemas (`configs/loss/*.yaml`): the training loss that replaces the softmax cross-entropy,
or the cross-entropy itself (the default). `name` picks the variant; each variant carries its paper's defaults."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any


@dataclass
class LossConfig:
    """The training loss. `cross_entropy` is the softmax cross-entropy; the other variants replace it."""

    name: str = "cross_entropy"

    variants: typing.ClassVar[dict[str, type]] = {}  # name -> schema

    @classmethod
    def variant(cls, name: Any) -> type | None:
        return cls.variants.get(name)

    def validate(self, problems: list[str]) -> None:
        pass


@dataclass
class CrossEntropyConfig(LossConfig):
    """The softmax cross-entropy, in fp32 (the default)."""

    name: str = "cross_entropy"


@dataclass
class StableMaxConfig(LossConfig):
    """StableMax cross-entropy (Prieto et al. 2025, arXiv 2501.04697): s(x) = x + 1 for x >= 0, 1/(1 - x + eps)
    for x < 0, p = s(x) / sum s(x), computed in float64 as the official code does."""

    name: str = "stablemax"
    eps: float = 1e-30  # the official code's epsilon in the x < 0 branch

    def validate(self, problems: list[str]) -> None:
        if not 0 <= self.eps < 1e-3:
            problems.append(f"loss.eps={self.eps} must be in [0, 1e-3): it only guards the x < 0 branch of "
                            "s(x); the official value is 1e-30")


@dataclass
class SphericalZConfig(LossConfig):
    """Spherical Z-loss (de Brebisson and Vincent 2016, arXiv 1604.08859): z = (o - mean(o)) / std(o) per position,
    loss = softplus(a * (b - z_target)) / a."""

    name: str = "spherical_z"
    a: float = 0.1  # sharpness of the softplus
    b: float = 10.0  # where the softplus bends, in standard deviations of the position's logits

    def validate(self, problems: list[str]) -> None:
        if not self.a > 0:
            problems.append(f"loss.a={self.a} must be > 0, e.g. 0.1")


LossConfig.variants.update(cross_entropy=CrossEntropyConfig, stablemax=StableMaxConfig,
                           spherical_z=SphericalZConfig)
