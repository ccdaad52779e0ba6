"""StableMax and the spherical Z-loss against short float64 references written from the papers (values and
gradients), the softmax-collapse monitor on logits with a known collapsed share, and what evaluation and sampling
report for such runs. The training runs (the loss falls, resume is exact) are in test_conformance.py."""

import math

import pytest
import torch

from llmstable.config import SphericalZConfig, StableMaxConfig
from llmstable.evaluate import validation_metrics
from llmstable.losses import (
    log_stablemax, softmax_collapse_fraction, spherical_z_loss, stablemax_cross_entropy, stablemax_probs,
)


def reference_stablemax_ce(logits, targets):
    """Prieto et al. 2025 (arXiv 2501.04697), eq. for StableMax, one position at a time in float64 python floats."""
    total = 0.0
    for row, t in zip(logits.tolist(), targets.tolist()):
        s = [x + 1.0 if x >= 0 else 1.0 / (1.0 - x + 1e-30) for x in row]
        total += -math.log(s[t] / sum(s))
    return total / len(targets)


def reference_spherical_z(logits, targets, a, b):
    """de Brebisson and Vincent 2016 (arXiv 1604.08859): z = (o - mu) / sigma, sigma^2 = mean(o^2) - mu^2,
    L = log(1 + exp(a (b - z_c))) / a; one position at a time in python floats."""
    total = 0.0
    for row, t in zip(logits.tolist(), targets.tolist()):
        mu = sum(row) / len(row)
        sigma = math.sqrt(sum(x * x for x in row) / len(row) - mu * mu)
        total += math.log1p(math.exp(a * (b - (row[t] - mu) / sigma))) / a
    return total / len(targets)


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=gen, dtype=torch.float64) * 4  # both signs, both branches of s
    return logits, torch.randint(0, 11, (6,), generator=gen)


def numerical_grad(f, x, h=1e-6):
    grad = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x).view(-1)
        e[i] = h
        grad.view(-1)[i] = (f(x + e.view_as(x)) - f(x - e.view_as(x))) / (2 * h)
    return grad


def test_stablemax_matches_the_float64_reference_in_value_and_gradient(batch):
    logits, targets = batch
    x = logits.clone().requires_grad_(True)
    loss = stablemax_cross_entropy(x, targets)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference_stablemax_ce(logits, targets), rel=1e-6)
    loss.backward()
    want = numerical_grad(lambda z: reference_stablemax_ce(z, targets), logits)
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-8)


def test_stablemax_is_computed_in_float64_from_fp32_logits():
    x = torch.tensor([[40.0, -1e6, 0.0]], dtype=torch.float32)
    logp = log_stablemax(x)
    assert logp.dtype == torch.float64
    assert stablemax_probs(x).sum().item() == pytest.approx(1.0, abs=1e-15)
    assert torch.isfinite(logp).all()  # 1/(1 + 1e6) is tiny but not zero: no -inf, unlike exp(-1e6) in a softmax


def test_spherical_z_matches_the_reference_in_value_and_gradient(batch):
    logits, targets = batch
    cfg = SphericalZConfig()
    x = logits.float().clone().requires_grad_(True)
    loss = spherical_z_loss(x, targets, cfg.a, cfg.b)
    assert loss.item() == pytest.approx(reference_spherical_z(logits, targets, cfg.a, cfg.b), rel=1e-5)
    loss.backward()
    want = numerical_grad(lambda z: reference_spherical_z(z, targets, cfg.a, cfg.b), logits)
    torch.testing.assert_close(x.grad.double(), want, rtol=1e-3, atol=1e-6)


def test_spherical_z_is_shift_and_scale_invariant(batch):
    logits, targets = batch
    base = spherical_z_loss(logits.float(), targets, 0.1, 10.0)
    assert spherical_z_loss(3 * logits.float() + 7, targets, 0.1, 10.0).item() == pytest.approx(base.item(), rel=1e-5)


def test_spherical_z_with_equal_logits_is_finite_and_raises_the_target():
    """A zero-initialised head: z = 0 (the authors' std + 1e-12), loss softplus(a b) / a, and a finite gradient
    (not the NaN of sqrt's derivative at 0) that lowers the loss by raising the target's logit."""
    x = torch.zeros(2, 5, requires_grad=True)
    loss = spherical_z_loss(x, torch.tensor([1, 3]), 0.1, 10.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(1.0)) / 0.1, rel=1e-6)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[0, 1] < 0 and x.grad[1, 3] < 0 and (x.grad[0, [0, 2, 3, 4]] > 0).all()


def test_the_collapse_monitor_counts_positions_whose_fp32_softmax_target_is_exactly_one():
    v = 50
    logits = torch.zeros(4, 5, v)
    targets = torch.zeros(4, 5, dtype=torch.long)
    logits[0, :, 0] = 200.0  # 5 positions: exp(-200) is below fp32's half-ulp of 1, p rounds to 1.0
    logits[1, :2, 0] = 200.0  # 2 more
    logits[2, :, 0] = 10.0  # p = 0.998...: large but not collapsed
    assert softmax_collapse_fraction(logits, targets).item() == pytest.approx(7 / 20)


def test_a_collapsed_position_has_a_zero_target_gradient_but_not_a_zero_gradient():
    """Logits [20, 0 x 9] in fp32: p_target = 1 / (1 + 9 e^-20) rounds to exactly 1.0, so the target's gradient
    component p_target - 1 is 0; every other component is p_j = e^-20 / (1 + 9 e^-20), about 2.06e-9, not 0."""
    logits = torch.tensor([[20.0] + [0.0] * 9], requires_grad=True)
    targets = torch.tensor([0])
    assert softmax_collapse_fraction(logits, targets).item() == 1.0
    torch.nn.functional.cross_entropy(logits, targets).backward()
    assert logits.grad[0, 0].item() == 0.0
    others = logits.grad[0, 1:]
    torch.testing.assert_close(others, torch.full((9,), math.exp(-20) / (1 + 9 * math.exp(-20))), rtol=1e-5, atol=0)


def test_validation_reports_the_runs_loss_and_the_softmax_cross_entropy(batch):
    blocks = torch.randint(0, 11, (4, 9), generator=torch.Generator().manual_seed(1))
    table = torch.randn(11, 11, generator=torch.Generator().manual_seed(2))

    def forward(ids):  # a bigram model: (B, T) -> (B, T, V)
        return table[ids]

    plain = validation_metrics(forward, blocks, 2, torch.device("cpu"), "fp32")
    assert set(plain) == {"val/loss", "val/ppl"}
    z = validation_metrics(forward, blocks, 2, torch.device("cpu"), "fp32", SphericalZConfig())
    assert z["val/softmax_ce"] == pytest.approx(plain["val/loss"], rel=1e-6)
    assert z["val/ppl"] == pytest.approx(plain["val/ppl"], rel=1e-5)  # Z-loss has no distribution: softmax ppl
    sm = validation_metrics(forward, blocks, 2, torch.device("cpu"), "fp32", StableMaxConfig())
    assert sm["val/ppl"] == pytest.approx(math.exp(sm["val/loss"]), rel=1e-5)  # StableMax NLL is a real NLL


def test_stablemax_sampling_draws_from_the_stablemax_distribution():
    from llmstable.generate import stablemax_generate

    class Fixed(torch.nn.Module):  # the same scores at every position
        cfg = type("C", (), {"max_seq_len": 8})

        def forward(self, ids):
            return torch.tensor([2.0, 0.0, -3.0]).expand(ids.shape[0], ids.shape[1], 3)

    gen = torch.Generator().manual_seed(0)
    out = stablemax_generate(Fixed(), torch.zeros(4000, 1, dtype=torch.long), 1, temperature=1.0, generator=gen)
    share = torch.bincount(out[:, 1], minlength=3).float() / 4000
    want = stablemax_probs(torch.tensor([2.0, 0.0, -3.0])).float()  # [3, 1, 1/4] / 4.25; softmax gives [.88, .12, .006]
    torch.testing.assert_close(share, want, atol=0.03, rtol=0)


def test_an_export_of_a_stablemax_run_says_what_its_logits_mean():
    note = StableMaxConfig().export_note()
    assert "StableMax" in note and "softmax" in note and "greedy" in note
