"""z-loss: an auxiliary loss that keeps the softmax normalizer near 1 (log Z near 0), so logits cannot drift to
large values (PaLM, Chowdhery et al. 2022, arXiv 2204.02311 section 5; Wortsman et al. 2023, arXiv 2309.14322)."""

from __future__ import annotations

import torch

from llmstable.stabilizers.hooks import Stabilizer


def z_loss(logits: torch.Tensor, coef: float) -> torch.Tensor:
    """coef * mean over tokens of logsumexp(logits)^2, computed in fp32. logits (..., V)."""
    return coef * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class ZLoss(Stabilizer):
    """Hook `on_loss`: adds `z_loss(logits, coef)` to every micro-batch's loss. Metric `train/z_loss` (the
    auxiliary term alone, mean over the micro-batches since the last row) is kept apart from `train/loss`."""

    name = "zloss"

    def __init__(self, coef: float = 1e-4):
        self.coef = coef
        self._sum = torch.zeros(())
        self._count = 0

    def on_loss(self, logits: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        aux = z_loss(logits, self.coef)
        self._sum = self._sum.to(aux.device) + aux.detach()  # stays on the device: no host sync per micro-batch
        self._count += 1
        return loss + aux

    def metrics(self) -> dict[str, float]:
        if not self._count:
            return {}
        value = self._sum.item() / self._count  # host sync, at logging time only
        self._sum, self._count = torch.zeros(()), 0
        return {"train/z_loss": value}

    def state_dict(self) -> dict:
        return {"sum": float(self._sum), "count": self._count}

    def load_state_dict(self, state: dict) -> None:
        self._sum, self._count = torch.tensor(state["sum"], dtype=torch.float32), state["count"]
