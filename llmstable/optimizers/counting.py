"""Optimizers that count: the SPAM family's global step counters and what they report (entries clipped, counted on
the device and read at logging time; momentum resets, a counter and one event each for events.jsonl).
`CountingOptimizer` is their base; `extra_state` / `load_extra_state` are how checkpoint code outside this package
reaches the counters of any optimizer (None for one that keeps none), without asking its class."""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class ClipResetStats:
    def __init__(self, name: str):
        self.name = name
        self.clipped = torch.zeros((), dtype=torch.int64)
        self.sharded = False  # counts are per shard: metrics() sums them over the ranks (a collective)
        self.resets = 0
        self.events: list[dict] = []

    def add_clipped(self, count: torch.Tensor) -> None:
        self.clipped = self.clipped.to(count.device) + count  # no host sync

    def reset_at(self, optimizer_step: int) -> None:
        self.resets += 1
        self.events.append({"event": "momentum_reset", "optimizer_step": optimizer_step})

    def metrics(self) -> dict[str, float]:
        """Entries clipped since the last call, and resets so far (one host sync, at logging time). With sharded
        parameters every rank must call this at the same step."""
        if self.sharded:
            torch.distributed.all_reduce(self.clipped)
        clipped = int(self.clipped.item())
        self.clipped = torch.zeros_like(self.clipped)
        return {f"stab/{self.name}/clipped": clipped, f"stab/{self.name}/resets": self.resets}

    def pop_events(self) -> list[dict]:
        events, self.events = self.events, []
        return events


class CountingOptimizer(Optimizer):
    """An Optimizer with `stats` (ClipResetStats) and global step counters. Subclasses set `self.stats` and
    implement `counters()` / `set_counters()`; the counters travel in `state_dict()[stats.name]`, so a reloaded
    optimizer continues its schedules exactly."""

    stats: ClipResetStats

    def counters(self) -> dict:
        raise NotImplementedError

    def set_counters(self, counters: dict) -> None:
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        return self.stats.metrics()

    def pop_events(self) -> list[dict]:
        return self.stats.pop_events()

    def global_state(self) -> dict:
        """The global counters and the reset count: what a reloaded optimizer needs beyond per-tensor state."""
        return {**self.counters(), "resets": self.stats.resets}

    def load_global_state(self, state: dict) -> None:
        state = dict(state)
        self.stats.resets = state.pop("resets")
        self.set_counters(state)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd[self.stats.name] = self.global_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        counters = state_dict.pop(self.stats.name, None)  # (torch.distributed.checkpoint carries them apart)
        super().load_state_dict(state_dict)
        if counters is not None:
            self.load_global_state(counters)


def extra_state(optimizer) -> dict | None:
    """The optimizer's state beyond its per-parameter tensors (SPAM's and Stable-SPAM's global counters), or None."""
    return optimizer.global_state() if isinstance(optimizer, CountingOptimizer) else None


def extra_state_key(optimizer) -> str | None:
    """The key under which the optimizer's state_dict() carries its extra state, or None."""
    return optimizer.stats.name if isinstance(optimizer, CountingOptimizer) else None


def load_extra_state(optimizer, state: dict | None) -> None:
    """Restore what extra_state() returned; events of the state-initialising step (DCP takes one) are dropped."""
    if state is not None and isinstance(optimizer, CountingOptimizer):
        optimizer.load_global_state(state)
        optimizer.stats.events.clear()


def state_bytes(optimizer) -> int | None:
    """Bytes of the tensors the optimizer keeps per parameter (moments, preconditioners, step counts), on this
    rank; None for an optimizer that keeps its state elsewhere (DeepSpeed's flat partitions)."""
    state = getattr(optimizer, "state", None)
    if not isinstance(state, dict):
        return None
    total = 0
    for entry in state.values():
        for value in (entry.values() if isinstance(entry, dict) else ()):
            if isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value  # (a DTensor shard under FSDP2)
                total += local.numel() * local.element_size()
    return total
