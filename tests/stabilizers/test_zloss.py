import torch

from llmstable.stabilizers import ZLoss, z_loss


def test_z_loss_equals_the_hand_written_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11) * 3
    by_hand = 0.0
    for row in logits.reshape(-1, 11).tolist():
        log_z = torch.log(torch.tensor(sum(torch.exp(torch.tensor(x, dtype=torch.float64)).item() for x in row)))
        by_hand += log_z.item() ** 2
    by_hand = 1e-4 * by_hand / 10
    assert abs(z_loss(logits, 1e-4).item() - by_hand) < 1e-9


def test_hook_adds_the_term_and_reports_it_apart():
    hook = ZLoss(coef=0.5)
    logits = torch.randn(3, 4, 7, requires_grad=True)
    ce = torch.tensor(2.0)
    total = hook.on_loss(logits, ce)
    assert torch.allclose(total, ce + z_loss(logits, 0.5))
    total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0  # the term has a gradient
    assert hook.metrics()["train/z_loss"] == pytest_approx(z_loss(logits, 0.5).item())
    assert hook.metrics() == {}  # reset after reading


def test_state_round_trip():
    hook = ZLoss(1e-4)
    hook.on_loss(torch.randn(2, 3, 5), torch.tensor(1.0))
    again = ZLoss(1e-4)
    again.load_state_dict(hook.state_dict())
    assert again.metrics() == hook.metrics()


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-6)
