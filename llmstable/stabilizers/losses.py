"""The hooks of the losses (llmstable.losses holds their math): the loss that replaces the softmax cross-entropy
(`compute_loss`, every micro-batch) and the softmax-collapse monitor (`begin_step` / `on_loss` / `metrics`)."""

from __future__ import annotations

import torch

from llmstable.losses import loss_function, softmax_collapse_fraction
from llmstable.stabilizers.hooks import Stabilizer


class ReplacingLoss(Stabilizer):
    """Hook `compute_loss`: every micro-batch, the configured loss (StableMax or the spherical Z-loss) in place of
    the softmax cross-entropy; `train/loss` then logs this loss."""

    name = "loss"

    def __init__(self, cfg):
        self.cfg, self.fn = cfg, loss_function(cfg)

    def compute_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.fn(logits, targets)


class SoftmaxCollapse(Stabilizer):
    """The softmax-collapse monitor (arXiv 2501.04697): at logged steps (`begin_step`), `on_loss` measures every
    micro-batch's collapsed share on the device; `metrics` reports the mean as `stab/softmax_collapse` (its one host
    sync, at logging time). Other steps cost nothing."""

    name = "softmax_collapse"

    def __init__(self):
        self._logged = False
        self._targets: torch.Tensor | None = None
        self._sum, self._count = None, 0

    def begin_step(self, step: int, logged: bool) -> None:
        self._logged = logged

    def compute_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self._targets = targets  # (kept for on_loss, which sees the logits but not the targets)
        return None

    def on_loss(self, logits: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        if self._logged and self._targets is not None:
            share = softmax_collapse_fraction(logits, self._targets)
            self._sum = share if self._sum is None else self._sum + share
            self._count += 1
        self._targets = None
        return loss

    def metrics(self) -> dict[str, float]:
        if not self._count:
            return {}
        value = self._sum.item() / self._count  # host sync, at logging time only
        self._sum, self._count = None, 0
        return {"stab/softmax_collapse": value}
