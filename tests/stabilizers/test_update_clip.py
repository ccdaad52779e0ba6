"""Update clipping: against a per-tensor reference written from the rule, the bound it enforces, the bitwise no-op
when nothing clips, an exact resume through the JSON trainer state, and named config errors."""

import json
import math
from collections import deque

import pytest
import torch

from llmstable.compose import compose_config
from llmstable.config import ConfigError
from llmstable.stabilizers import UpdateClip

SHAPES = {"a": (6, 5), "b": (7,), "c": (3, 4)}


class Params(torch.nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        for name, shape in SHAPES.items():
            self.register_parameter(name, torch.nn.Parameter(torch.randn(shape, generator=gen)))


def updates(steps, seed=1):
    """A stream of per-tensor updates with occasional spikes (x30 on one tensor)."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        out = {n: torch.randn(s, generator=gen) * 1e-2 for n, s in SHAPES.items()}
        if t % 11 == 7:
            out["a" if t % 2 else "c"] *= 30.0
        yield out


def apply(model, hook, update):
    """One 'optimizer step' that adds `update`, between the two hooks."""
    hook.before_update(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(update[n])
    hook.on_update(model)


class Reference:
    """The rule, per tensor, in float64 with a deque: clip the RMS to k x mean(last `window` applied RMS values)
    once `min_history` values are in; remember the applied RMS."""

    def __init__(self, k, window, min_history):
        self.k, self.min_history = k, min_history
        self.hist = {n: deque(maxlen=window) for n in SHAPES}

    def step(self, params, update):
        for n, u in update.items():
            u = u.double()
            rms = u.norm().item() / math.sqrt(u.numel())
            h = self.hist[n]
            scale = 1.0
            if len(h) >= self.min_history and rms > self.k * (sum(h) / len(h)):
                scale = self.k * (sum(h) / len(h)) / rms
            params[n] += u * scale
            h.append(rms * scale)


def test_matches_the_per_tensor_reference_over_a_spiky_stream():
    model, hook = Params(), UpdateClip(k=2.0, window=8, min_history=4)
    ref = Reference(2.0, 8, 4)
    ref_params = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for update in updates(60):
        apply(model, hook, update)
        ref.step(ref_params, update)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), ref_params[n], rtol=0, atol=1e-6)
    assert hook.metrics()["stab/update_clip/clipped"] >= 5  # the spikes were clipped


def test_every_applied_update_is_within_k_times_its_running_mean():
    model, hook = Params(), UpdateClip(k=1.5, window=5, min_history=3)
    for t, update in enumerate(updates(40)):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        means = {n: h.sum().item() / min(hook.updates, 5) for n, h in hook.history.items()}
        apply(model, hook, update)
        if t < 3:
            continue
        for n, p in model.named_parameters():
            rms = ((p.detach() - before[n]).norm() / math.sqrt(p.numel())).item()
            assert rms <= 1.5 * means[n] * (1 + 1e-5), (t, n, rms, means[n])


def test_nothing_clipped_is_bitwise_the_plain_update():
    model, plain, hook = Params(), Params(), UpdateClip(k=1e6, window=4, min_history=1)
    for update in updates(12):
        apply(model, hook, update)
        with torch.no_grad():
            for n, p in plain.named_parameters():
                p.add_(update[n])
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)
    assert hook.metrics()["stab/update_clip/clipped"] == 0


def test_resume_through_json_continues_bit_identically():
    stream = list(updates(40))
    full_model, full = Params(), UpdateClip(k=2.0, window=8, min_history=4)
    for update in stream:
        apply(full_model, full, update)
    part_model, part = Params(), UpdateClip(k=2.0, window=8, min_history=4)
    for update in stream[:23]:
        apply(part_model, part, update)
    resumed = UpdateClip(k=2.0, window=8, min_history=4)
    resumed.load_state_dict(json.loads(json.dumps(part.state_dict())))
    for update in stream[23:]:
        apply(part_model, resumed, update)
    for p, q in zip(full_model.parameters(), part_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("override, message", [
    ("stabilizer.update_clip.k=1.0", "stabilizer.update_clip.k=1.0 must be > 1"),
    ("stabilizer.update_clip.window=0", "stabilizer.update_clip.window=0 must be > 0"),
    ("stabilizer.update_clip.min_history=200", "stabilizer.update_clip.min_history=200 must be in [1, window=128]"),
])
def test_bad_values_are_named(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        compose_config(["stabilizer=[update_clip]", override], run_dir=tmp_path)


def test_refused_under_deepspeed(tmp_path):
    with pytest.raises(ConfigError, match=r"stabilizer=\['update_clip'\] cannot run under distributed=deepspeed"):
        compose_config(["stabilizer=[update_clip]", "distributed=deepspeed"], run_dir=tmp_path)
