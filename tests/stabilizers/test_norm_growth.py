"""The norm-growth limiter: Fira's arithmetic bit for bit, the bound it enforces, and an exact resume through the
JSON trainer state."""

import json

import pytest
import torch

from llmstable.config import ConfigError
from llmstable.model import Llama, LlamaConfig
from llmstable.stabilizers import NormGrowthLimiter, limit_norm_growth

CFG = LlamaConfig(vocab_size=64, dim=32, intermediate_size=64, n_layers=2, n_heads=4, max_seq_len=8)


def official_limiter(x, prev):
    """The lines of the official fira_adamw.py, as they are (a host-side max over a tensor)."""
    norm = torch.norm(x)
    limiter = max(norm / (prev + 1e-8), 1.01) / 1.01
    return x / limiter, norm / limiter


def test_equals_the_official_limiter_bit_for_bit_on_a_spiky_stream():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 24, generator=g)
    prev = torch.norm(x)
    for t in range(200):
        x = torch.randn(40, 24, generator=g) * (1.0 + 0.02 * torch.rand((), generator=g)) * (50 if t % 17 == 0 else 1)
        ours, our_norm, _ = limit_norm_growth(x, torch.norm(x), prev)
        ref, ref_norm = official_limiter(x, prev)
        assert torch.equal(ours, ref) and torch.equal(our_norm, ref_norm)
        prev = our_norm


def test_by_hand_a_doubled_norm_is_scaled_to_1_01_and_a_small_one_is_left_alone():
    x = torch.tensor([3.0, 4.0])  # norm 5
    out, norm, limited = limit_norm_growth(x, torch.norm(x), torch.tensor(2.5))
    assert limited and torch.allclose(torch.norm(out), torch.tensor(2.5 * 1.01)) and torch.allclose(norm, torch.norm(out))
    torch.testing.assert_close(out / torch.norm(out), x / 5)  # direction kept
    out, norm, limited = limit_norm_growth(x, torch.norm(x), torch.tensor(5.0))
    assert not limited and torch.equal(out, x) and torch.equal(norm, torch.tensor(5.0))


def model_with_grads(scale):
    torch.manual_seed(0)
    model = Llama(CFG)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * scale
    return model


def test_hook_bounds_every_tensors_growth_per_step_and_counts_the_limited_ones():
    hook = NormGrowthLimiter(gamma=1.01)
    first = model_with_grads(1.0)
    hook.on_gradients(first)  # the first step records only
    norms = {n: p.grad.norm() for n, p in first.named_parameters()}
    assert hook.metrics()["stab/norm_growth_limiter/limited"] == 0
    grown = model_with_grads(3.0)  # every tensor's gradient triples
    hook.on_gradients(grown)
    for n, p in grown.named_parameters():
        torch.testing.assert_close(p.grad.norm(), norms[n] * 1.01)
    assert hook.metrics()["stab/norm_growth_limiter/limited"] == len(norms)
    shrunk = model_with_grads(0.5)  # below the limit: untouched
    before = {n: p.grad.clone() for n, p in shrunk.named_parameters()}
    hook.on_gradients(shrunk)
    assert all(torch.equal(p.grad, before[n]) for n, p in shrunk.named_parameters())


def test_state_round_trips_through_json_and_continues_bit_identically():
    def stream(hook, scales):
        out = []
        for s in scales:
            model = model_with_grads(s)
            hook.on_gradients(model)
            out.append([p.grad.clone() for p in model.parameters()])
        return out

    scales = [1.0, 2.0, 0.7, 5.0, 1.3, 9.0]
    full = stream(NormGrowthLimiter(), scales)
    first = NormGrowthLimiter()
    stream(first, scales[:3])
    again = NormGrowthLimiter()
    again.load_state_dict(json.loads(json.dumps(first.state_dict())))  # what the trainer's state.json does
    for a, b in zip(full[3:], stream(again, scales[3:])):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_gamma_below_1_is_refused_by_the_config_and_the_class(tiny_config):
    with pytest.raises(ConfigError, match=r"stabilizer.norm_growth_limiter.gamma=0.5 must be >= 1"):
        tiny_config("stabilizer=[norm_growth_limiter]", "stabilizer.norm_growth_limiter.gamma=0.5")
    with pytest.raises(ValueError, match="gamma=0.5"):
        NormGrowthLimiter(0.5)
