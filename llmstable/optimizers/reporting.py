"""What SPAM-family optimizers report: entries clipped (counted on the device, read at logging time) and momentum
resets (a counter, and one event each for events.jsonl)."""

from __future__ import annotations

import torch


class ClipResetStats:
    def __init__(self, name: str):
        self.name = name
        self.clipped = torch.zeros((), dtype=torch.int64)
        self.resets = 0
        self.events: list[dict] = []

    def add_clipped(self, count: torch.Tensor) -> None:
        self.clipped = self.clipped.to(count.device) + count  # no host sync

    def reset_at(self, optimizer_step: int) -> None:
        self.resets += 1
        self.events.append({"event": "momentum_reset", "optimizer_step": optimizer_step})

    def metrics(self) -> dict[str, float]:
        """Entries clipped since the last call, and resets so far (one host sync, at logging time)."""
        clipped = int(self.clipped.item())
        self.clipped = torch.zeros_like(self.clipped)
        return {f"stab/{self.name}/clipped": clipped, f"stab/{self.name}/resets": self.resets}

    def pop_events(self) -> list[dict]:
        events, self.events = self.events, []
        return events
