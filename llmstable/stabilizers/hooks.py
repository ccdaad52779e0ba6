"""The stabilizer hook base class. Every hook does nothing by default; a stabilizer overrides the few it needs.

Stabilizers are built before the engine, and are told then what the run allows (`Capabilities`), so that none is
changed afterwards. Hooks fire in this order, on every rank alike, and call torch.distributed themselves only for
a value that exists per rank, always at a point every rank reaches alike, decided by the step number and state that
all ranks share: QK-clip's attention-logit maxima (measured on each rank's share of the batch) and the spike
guard's per-block gradient norms over FSDP2 shards (`parallel.dtensors.block_norms`) are all-reduced in `on_gradients`;
the early warning's curvature predictor under DDP averages its gradient and product in `on_loss`, on curvature
steps only:

- `configure_model(model_cfg)`: once, before the model is built; may change the architecture config.
- `transform_model(model)`: once, after the model is built and before the optimizer sees its parameters; may swap
  modules (e.g. fake-quantized linears). Applied from outside, so the model file stays plain.
- `compute_loss(logits, targets)`: every micro-batch, in place of the cross-entropy. The first stabilizer that
  returns a tensor provides the training loss (StableMax, say); None keeps the cross-entropy. `train/loss` logs
  whatever loss was trained on.
- `on_loss(logits, loss)`: every micro-batch, after the training loss and before backward; returns the loss to
  backpropagate (e.g. plus an auxiliary term).
- `on_gradients(model)`: every optimizer step, after the last micro-batch's backward (gradients already reduced
  across ranks; sharded engines hand DTensor gradients) and before clipping and the gradient norm; may change
  `p.grad` in place (gradient transforms: norm-growth limiting, orthogonal projection). Not called where the engine
  updates inside backward (`Capabilities.fused_step`, DeepSpeed): such a stabilizer must refuse that engine in
  its config check.
- `check_step(step, values, rollbacks_so_far)`: every optimizer step, after clipping and before the optimizer step,
  with the step's `loss` and `grad_norm` as host floats (already reduced across ranks); returns None or an
  `Action` for the trainer to carry out: skip the update, roll back, abort, or replay. The first action wins.
- `on_replay(step, first, replayed)`: after a stabilizer's `check_step` asked for `Action("replay")`, the trainer
  recomputes the step from the same state, with the same batch and the same RNG (forward, backward, gradient hooks,
  clipping), and calls this on that stabilizer with both results; it returns None or an action (not another
  replay). The step goes on with the replayed gradients and values. A stabilizer that may ask for a replay sets
  `replays = True` (the trainer then keeps a replay point each step: the data position and the RNG states); it
  may only ask where `Capabilities.can_replay`.
- `before_update(model)`: every optimizer step whose update is about to be applied, right before it (after the
  step-check hooks let it through): the weights are still those the gradients were taken at. For a stabilizer
  that needs the update itself (update clipping keeps a copy of the weights here). Not called under a fused step.
- `on_update(model)`: every optimizer step whose update was applied, right after it (update clipping, weight
  rescaling such as QK-clip). Like `on_gradients`, not called under a fused step.
- `metrics()`: at logging intervals; returns `stab/<name>/...` values (this is where a stabilizer may sync).

Four small hooks serve the diagnostics (StableMax's collapse monitor, the preconditioner warning, the SDC replay):
- `bind_optimizer(optimizer)`: once, after the engine and optimizer are built (read-only use of its state).
- `begin_step(step, logged)`: every optimizer step, before the LR is applied and the forward runs; `logged` says
  whether this step writes a metrics row, so a monitor can measure at logged steps only.
- `lr_factor(step)`: every optimizer step, when the LR is set; the product over the stabilizers multiplies it.
- `events()`: after every counted step (and once when the run stops): what the stabilizer has to write to
  events.jsonl since the last call, as (event, step, fields).

`state_dict()` / `load_state_dict()` carry whatever the stabilizer needs for an exact resume. A hook that concludes the
machine itself computes wrongly raises `SuspectedHardwareFault` (`llmstable train` exits with code 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Capabilities:
    """What the run's engine lets a stabilizer do, known when the stabilizers are built."""

    fused_step: bool = False  # the engine clips and updates inside backward (DeepSpeed)

    @property
    def can_skip(self) -> bool:
        """An update can be withheld after the step is checked (not once it has been applied)."""
        return not self.fused_step

    @property
    def can_replay(self) -> bool:
        """A step can be recomputed from the same state before it is applied."""
        return not self.fused_step


@dataclass
class Detection:
    metric: str
    value: float
    threshold: float
    rule: str  # non_finite | window | ema_ratio | a stabilizer's own
    details: dict = field(default_factory=dict)  # extra fields for the `spike` event (e.g. the layer it came from)


@dataclass
class Action:
    """What a stabilizer asks the trainer to do at this step."""

    kind: str  # skip_step | rollback | abort | replay
    detections: list[Detection] = field(default_factory=list)
    lr_cut: bool = False
    moment_reset: bool = False


class Stabilizer:
    name = "stabilizer"
    replays = False  # True if check_step may return Action("replay")

    def configure_model(self, model_cfg) -> None:
        """Before the model is built (architecture switches)."""

    def transform_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """After the model is built, before the optimizer is; returns the model to train."""
        return model

    def compute_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Each micro-batch: a loss that replaces the cross-entropy, or None."""
        return None

    def on_loss(self, logits: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """Each micro-batch: the loss to backpropagate."""
        return loss

    def on_gradients(self, model: torch.nn.Module) -> None:
        """Each optimizer step, after backward and before clipping: may change the gradients in place."""

    def check_step(self, step: int, values: dict[str, float], rollbacks_so_far: int) -> Action | None:
        """Each optimizer step, before the update: None, or an action for the trainer."""
        return None

    def on_replay(self, step: int, first: dict[str, float], replayed: dict[str, float]) -> Action | None:
        """After the replay this stabilizer asked for: None, or an action for the trainer (not a replay)."""
        return None

    def before_update(self, model: torch.nn.Module) -> None:
        """Each optimizer step whose update is about to be applied, right before it."""

    def on_update(self, model: torch.nn.Module) -> None:
        """Each applied optimizer step, right after the update."""

    def metrics(self) -> dict[str, float]:
        """At logging time: metrics since the last call."""
        return {}

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Once, after the optimizer is built: a stabilizer that reads its state keeps a reference."""

    def begin_step(self, step: int, logged: bool) -> None:
        """Each optimizer step, before its forward: the step number and whether it writes a metrics row."""

    def lr_factor(self, step: int) -> float:
        """Each optimizer step: a factor on the LR (1.0 leaves it alone)."""
        return 1.0

    def events(self) -> list[tuple[str, int, dict]]:
        """After each counted step: (event, step, fields) to write to events.jsonl since the last call."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SuspectedHardwareFault(RuntimeError):
    """A stabilizer concluded that the machine computes wrongly (e.g. too many replays that did not reproduce):
    the run stops (`llmstable train` exits with code 4) and the message says to check the machine."""


def log_stabilizer_events(log, stabilizers) -> None:
    """Write what the stabilizers noted since the last call to events.jsonl (the trainer calls it after every
    counted step, and once when the run stops, so nothing noted before an abort is lost)."""
    for stabilizer in stabilizers:
        for event, step, fields in stabilizer.events():
            log.event(event, step, **fields)


def lr_factor(stabilizers, step: int) -> float:
    """The product of the stabilizers' LR factors for `step`."""
    factor = 1.0
    for stabilizer in stabilizers:
        factor *= stabilizer.lr_factor(step)
    return factor
