"""The preconditioner early warning (Bai et al. 2025, arXiv 2506.04805): the proxy on constructed gradients and
second moments, the predictor on a quadratic whose Hessian is known, and the warning's crossing and LR lowering."""

import pytest
import torch

from llmstable.config import SpikeGuardConfig
from llmstable.stabilizers.warning import (
    PrecondWarning, adam_preconditioner, adam_v_hat, block_stale_fractions, directional_curvature, stale_counts,
)


def test_the_proxy_counts_coordinates_whose_squared_gradient_is_below_rho_v_hat():
    grad = torch.tensor([0.01, 0.5, -0.05, 2.0])
    v_hat = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert int(stale_counts(grad, v_hat, rho=0.01)) == 2  # 1e-4 and 2.5e-3 are below 0.01; 0.25 and 4 are not


class TwoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False)])


def test_block_fractions_read_adams_bias_corrected_second_moment():
    model = TwoBlocks()
    opt = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.95))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # v = 0.05 after one step; v_hat = v / (1 - 0.95) = 1
    w0, w1 = (layer.weight for layer in model.layers)
    torch.testing.assert_close(adam_v_hat(opt, w0), torch.ones_like(w0))
    w0.grad = torch.full_like(w0, 0.05)  # g^2 = 0.0025 < 0.01: all 16 stale
    w1.grad = torch.cat([torch.full((2, 4), 0.05), torch.ones(2, 4)])  # half stale
    torch.testing.assert_close(block_stale_fractions(model, opt, rho=0.01), torch.tensor([1.0, 0.5]))


def test_the_predictor_is_the_gradient_directional_curvature_of_the_preconditioned_hessian():
    """L(x) = x^T A x / 2, so H = A; with P = diag(p), lambda = g^T P A g / g^T g, g = A x."""
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    a = m @ m.T + torch.eye(5, dtype=torch.float64)
    x = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    p = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    loss = 0.5 * x @ a @ x
    got = directional_curvature(loss, [x], [p])
    g = a @ x.detach()
    assert got.item() == pytest.approx(float(g @ (p * (a @ g)) / (g @ g)), rel=1e-5)
    loss.backward()  # the loss's graph is kept for the step's own backward
    torch.testing.assert_close(x.grad, g)


def test_the_warnings_curvature_uses_the_v_hat_this_steps_update_applies():
    """The predictor through the warning's hooks on L(x) = x^T A x / 2 (H = A) after one AdamW step: by hand,
    v_2 = beta2 v_1 + (1 - beta2) g_2^2 with g_2 the step's gradient, P = 1 / (sqrt(v_2 / (1 - beta2^2)) + eps) and
    lambda = g^T P A g / g^T g; the previous step's v_hat gives a different number."""
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    a = m @ m.T + torch.eye(4, dtype=torch.float64)
    x = torch.nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64))
    b1, b2, eps = 0.9, 0.95, 1e-8
    opt = torch.optim.AdamW([x], lr=0.1, betas=(b1, b2), eps=eps, weight_decay=0.0)
    g1 = torch.tensor([3.0, 0.1, -0.5, 1.0], dtype=torch.float64)  # unlike g_2, so the two v_hat differ
    x.grad = g1.clone()
    opt.step()
    warning = PrecondWarning(SpikeGuardConfig(watch=["loss", "precond_curvature"], curvature_interval=1,
                                              min_history=0), proxy=False, curvature=True)
    warning.optimizer = opt
    warning.begin_step(2, logged=True)
    loss = 0.5 * x @ a @ x
    warning.on_loss(loss)
    opt.zero_grad()
    loss.backward()
    g2 = (a @ x.detach()).clone()
    warning.check(2)
    got = warning.metrics()["stab/precond/curvature"]
    v2 = b2 * (1 - b2) * g1**2 + (1 - b2) * g2**2
    p_now = 1 / ((v2 / (1 - b2**2)).sqrt() + eps)
    want = float(g2 @ (p_now * (a @ g2)) / (g2 @ g2))
    assert got == pytest.approx(want, rel=1e-6)
    p_before = 1 / ((g1**2).sqrt() + eps)  # v_1 / (1 - beta2) = g_1^2
    assert abs(float(g2 @ (p_before * (a @ g2)) / (g2 @ g2)) - want) > 0.1 * abs(want)


def test_the_preconditioner_is_one_over_sqrt_v_hat_plus_eps():
    model = TwoBlocks()
    opt = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.95), eps=1e-8)
    assert adam_preconditioner(opt) is None  # no state before the first step
    for p in model.parameters():
        p.grad = torch.full_like(p, 2.0)
    opt.step()  # v_hat = 4
    params, precond = adam_preconditioner(opt)
    assert len(params) == 2
    torch.testing.assert_close(precond[0], torch.full_like(params[0], 1 / (2 + 1e-8)))


def test_a_stale_block_warns_at_logged_steps_and_lowers_the_lr_for_a_few_steps():
    cfg = SpikeGuardConfig(watch=["loss", "precond"], warn_lr_factor=0.5, warn_lr_steps=3, min_history=2)
    model = TwoBlocks()
    opt = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.95))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    warning = PrecondWarning(cfg, proxy=True, curvature=False)
    warning.optimizer = opt
    warning.begin_step(2, logged=False)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.01)
    warning.on_gradients(model)
    assert warning.check(2) is None  # not a logged step: nothing measured, nothing synced
    warning.begin_step(3, logged=True)
    warning.on_gradients(model)
    fields = warning.check(3)
    assert fields["signal"] == "precond" and fields["value"] == 1.0 and fields["until_step"] == 6
    assert [warning.lr_factor(s) for s in (4, 6, 7)] == [0.5, 0.5, 1.0]
    assert warning.metrics()["stab/precond/stale_frac/layer_1"] == 1.0
    restored = PrecondWarning(cfg, proxy=True, curvature=False)
    restored.load_state_dict(warning.state_dict())
    assert restored.lower_until == 6 and restored.warnings == 1
