"""The stabilizer hook base class. Every hook does nothing by default; a stabilizer overrides the few it needs.

Hooks fire in this order, on every rank alike, and never call torch.distributed themselves:
- `configure_model(model_cfg)`: once, before the model is built; may change the architecture config.
- `transform_model(model)`: once, after the model is built and before the optimizer sees its parameters; may swap
  modules (e.g. fake-quantized linears). Applied from outside, so the model file stays plain.
- `on_loss(logits, loss)`: every micro-batch, after the cross-entropy and before backward; returns the loss to
  backpropagate (e.g. plus an auxiliary term).
- `check_step(step, values, rollbacks_so_far)`: every optimizer step, after backward and clipping and before the
  optimizer step, with the step's `loss` and `grad_norm` as host floats (already reduced across ranks); returns
  None or an action for the trainer to carry out (skip the update, roll back, abort).
- `metrics()`: at logging intervals; returns `stab/<name>/...` values (this is where a stabilizer may sync).

`state_dict()` / `load_state_dict()` carry whatever the stabilizer needs for an exact resume.
"""

from __future__ import annotations

import torch


class Stabilizer:
    name = "stabilizer"

    def configure_model(self, model_cfg) -> None:
        """Before the model is built (architecture switches)."""

    def transform_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """After the model is built, before the optimizer is; returns the model to train."""
        return model

    def on_loss(self, logits: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """Each micro-batch: the loss to backpropagate."""
        return loss

    def check_step(self, step: int, values: dict[str, float], rollbacks_so_far: int):
        """Each optimizer step, before the update: None, or an action (see llmstable.stabilizers.spike.Action)."""
        return None

    def metrics(self) -> dict[str, float]:
        """At logging time: metrics since the last call."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
