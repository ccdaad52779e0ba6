"""The hook points, each driven by a tiny stabilizer that lives here, not in the package: gradient transforms
(`on_gradients`), update transforms (`on_update`), a loss that replaces the cross-entropy (`compute_loss`), and a
replay of the step (`Action("replay")` + `on_replay`). Each is checked by what it does to a real tiny run against
the same run without it (same initial weights, same data)."""

import pytest
import torch

from llmstable import checkpoint as ckpt
from llmstable.metrics import read_jsonl
from llmstable.stabilizers import Action, Stabilizer
from llmstable.losses import cross_entropy
from llmstable.trainer import train


class HalveGradients(Stabilizer):
    """on_gradients: scale every gradient by 0.5 before clipping (the logged norm is the pre-clip one)."""

    name = "halve_gradients"

    def __init__(self):
        self.calls = 0

    def on_gradients(self, model):
        self.calls += 1
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(0.5)

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state.get("calls", 0)


class PinFinalNorm(Stabilizer):
    """on_update: put the final norm's weight back to ones after every update."""

    name = "pin_final_norm"

    def on_update(self, model):
        with torch.no_grad():
            model.norm.weight.fill_(1.0)


class DoubleLoss(Stabilizer):
    """compute_loss: train on twice the cross-entropy instead of the cross-entropy."""

    name = "double_loss"

    def compute_loss(self, logits, targets):
        return 2.0 * cross_entropy(logits, targets)


class ReplayStep(Stabilizer):
    """check_step asks for a replay of step `at`; on_replay records both results."""

    name = "replay_step"
    replays = True

    def __init__(self, at):
        self.at, self.seen = at, []

    def check_step(self, step, values, rollbacks_so_far):
        return Action("replay") if step == self.at and not self.seen else None

    def on_replay(self, step, first, replayed):
        self.seen.append((step, first, replayed))
        return None


def rows(run):
    return {r["step"]: r for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r}


STEPS = ["train.max_steps=4", "train.checkpoint_interval=2", "train.max_norm=null"]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """The same run without any test stabilizer (shared by the tests below)."""
    from conftest import TINY
    from llmstable.compose import compose_config

    run = tmp_path_factory.mktemp("hooks") / "plain"
    train(compose_config([*TINY, *STEPS], run_dir=run))
    return run


@pytest.mark.trains
def test_on_gradients_changes_the_gradients_before_clipping_and_the_norm(tiny_config, tmp_path, plain_run):
    plain = rows(plain_run)
    hook = HalveGradients()
    train(tiny_config(*STEPS, run_dir=tmp_path / "hook"), extra_stabilizers=(hook,))
    halved = rows(tmp_path / "hook")
    assert hook.calls == 4
    assert halved[1]["optim/grad_norm"] == 0.5 * plain[1]["optim/grad_norm"]  # exact: a power of two
    assert halved[1]["train/loss"] == plain[1]["train/loss"]  # same weights at step 1


@pytest.mark.trains
def test_on_update_acts_after_each_applied_update(tiny_config, tmp_path, plain_run):
    train(tiny_config(*STEPS, run_dir=tmp_path / "hook"), extra_stabilizers=(PinFinalNorm(),))
    from safetensors.torch import load_file

    plain = load_file(str(ckpt.latest_valid(plain_run / "checkpoints") / "model.safetensors"))
    pinned = load_file(str(ckpt.latest_valid(tmp_path / "hook" / "checkpoints") / "model.safetensors"))
    assert torch.equal(pinned["norm.weight"], torch.ones_like(pinned["norm.weight"]))
    assert not torch.equal(plain["norm.weight"], torch.ones_like(plain["norm.weight"]))


@pytest.mark.trains
def test_a_loss_provider_replaces_the_cross_entropy(tiny_config, tmp_path, plain_run):
    plain = rows(plain_run)
    train(tiny_config(*STEPS, run_dir=tmp_path / "hook"), extra_stabilizers=(DoubleLoss(),))
    doubled = rows(tmp_path / "hook")
    assert doubled[1]["train/loss"] == 2.0 * plain[1]["train/loss"]
    assert doubled[1]["optim/grad_norm"] == 2.0 * plain[1]["optim/grad_norm"]


@pytest.mark.trains
def test_a_replayed_step_recomputes_the_same_result_and_the_run_goes_on_unchanged(tiny_config, tmp_path, plain_run):
    plain = rows(plain_run)
    hook = ReplayStep(at=3)
    train(tiny_config(*STEPS, run_dir=tmp_path / "hook"), extra_stabilizers=(hook,))
    ((step, first, replayed),) = hook.seen
    assert step == 3 and first == replayed == {"loss": plain[3]["train/loss"], "grad_norm": plain[3]["optim/grad_norm"]}
    replay_rows = rows(tmp_path / "hook")
    for n in plain:
        assert {k: v for k, v in replay_rows[n].items() if not k.startswith("perf/")} == {
            k: v for k, v in plain[n].items() if not k.startswith("perf/")}
