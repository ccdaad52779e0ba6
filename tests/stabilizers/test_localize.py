"""Per-layer spike localisation: a gradient spike injected into one block of a real tiny model is attributed to
that block, the block that moved first is found in a synthetic history, and a clean step costs no host sync for
the localisation."""

import pytest
import torch

from llmstable.config import SpikeGuardConfig
from llmstable.model import Llama, LlamaConfig
from llmstable.stabilizers.localize import first_mover
from llmstable.stabilizers.spike import SpikeGuard


def tiny_model():
    torch.manual_seed(0)
    return Llama(LlamaConfig(dim=32, intermediate_size=64, n_layers=4, n_heads=2, vocab_size=64, max_seq_len=16))


def guarded_steps(model, guard, steps, spike_at=None, block=None, factor=100.0):
    """Forward/backward on random batches; at `spike_at`, block `block`'s gradients times `factor` (after backward,
    as a hardware or numerics fault in that block would). Returns the action of the last step."""
    gen = torch.Generator().manual_seed(1)
    action = None
    for step in range(1, steps + 1):
        model.zero_grad()
        ids = torch.randint(0, 64, (4, 12), generator=gen)
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))
        loss.backward()
        if step == spike_at:
            for p in model.layers[block].parameters():
                p.grad.mul_(factor)
        guard.begin_step(step, logged=False)
        guard.on_gradients(model)
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
        action = guard.check_step(step, {"loss": loss.item(), "grad_norm": grad_norm}, 0)
        assert (action is not None) == (step == spike_at), step
    return action


@pytest.mark.parametrize("block", [1, 2])
def test_a_gradient_spike_in_one_block_is_attributed_to_that_block(block):
    model = tiny_model()
    guard = SpikeGuard(SpikeGuardConfig(watch=["grad_norm"], min_history=5, window=32))
    action = guarded_steps(model, guard, steps=24, spike_at=24, block=block)
    assert action.kind == "skip_step"
    details = action.detections[0].details
    assert details["layer"] == block
    assert details["layer_moved_at"] == 24
    assert len(details["layer_grad_norms"]) == 4
    ratios = details["layer_grad_ratios"]
    assert ratios[block] > 20 and max(r for i, r in enumerate(ratios) if i != block) < 3


def test_the_block_that_crossed_its_own_history_first_is_named_even_if_another_is_larger_at_the_spike():
    history = torch.ones(20, 3) + 0.01 * torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    recent = torch.tensor([[1.0, 1.0, 1.0],
                           [1.0, 1.0, 1.5],  # block 2 rises first (50 std above its history)
                           [1.0, 9.0, 3.0]])  # block 1 is the largest at the spike
    block, index, ratios = first_mover(history, recent, k_std=6.0)
    assert (block, index) == (2, 1)
    assert ratios[1] == pytest.approx(9.0, rel=0.05)


def test_a_clean_step_reads_nothing_back_from_the_device(monkeypatch):
    model = tiny_model()
    guard = SpikeGuard(SpikeGuardConfig(watch=["grad_norm"], min_history=5, window=16))
    guarded_steps(model, guard, steps=3)

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync on a clean step")

    monkeypatch.setattr(torch.Tensor, "tolist", no_sync)
    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    model.zero_grad()
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    guard.begin_step(4, logged=False)
    guard.on_gradients(model)
    assert guard.check_step(4, {"loss": 1.0, "grad_norm": 1.0}, 0) is None
