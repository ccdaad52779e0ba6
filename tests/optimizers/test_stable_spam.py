import math

import pytest
import torch

from llmstable.optimizers import StableSPAM
from llmstable.optimizers.stable_spam import stable_spam_scale
from reference import ReferenceStableSPAM
from streams import gradients, make_params, max_diff, run

HP = dict(lr=1e-2, weight_decay=0.1, total_T=400, eta_min=0.5, update_proj_gap=60)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_matches_the_reference_over_a_long_run_with_spikes_resets_and_decay(amsgrad):
    ours, opt, _ = run(lambda g: StableSPAM(g, amsgrad=amsgrad, **HP), 400)
    ref, _, _ = run(lambda g: ReferenceStableSPAM(g, amsgrad=amsgrad, **HP), 400)
    metrics = opt.metrics()
    assert metrics["stab/stable_spam/resets"] == 6 and metrics["stab/stable_spam/clipped"] > 0
    assert max_diff(ours, ref) < 1e-6


@pytest.mark.slow
@pytest.mark.subprocess  # (inductor starts its compile workers and the C++ compiler)
def test_compiled_update_matches_the_reference():
    ours, _, _ = run(lambda g: StableSPAM(g, compiled=True, **HP), 130)
    ref, _, _ = run(lambda g: ReferenceStableSPAM(g, **HP), 130)
    assert max_diff(ours, ref) < 1e-6


def test_cosine_factor():
    assert stable_spam_scale(5, None, 0.5) == 1.0
    assert stable_spam_scale(0, 100, 0.5) == 1.0
    assert stable_spam_scale(101, 100, 0.5) == pytest.approx(0.5)
    assert stable_spam_scale(30, 100, 0.2) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi * 30 / 101)) / 2)


def test_adaclip_scales_a_spike_down_to_the_running_max():
    p = torch.nn.Parameter(torch.zeros(100))
    opt = StableSPAM([p], lr=1e-3, gamma3=0.9)
    for _ in range(20):
        p.grad = torch.full((100,), 0.01)
        opt.step()
    mu = opt.state[p]["norm_stats"][0].item()
    opt.metrics()  # drop the counts so far
    grad = torch.full((100,), 0.01)
    grad[3] = 10.0
    p.grad = grad
    opt.step()
    tau = (0.9 * mu + 0.1 * 10.0) / (1 - 0.9**21)
    assert opt.metrics()["stab/stable_spam/clipped"] == 1
    assert tau < 10.0  # the spike entry was above the threshold and got scaled to tau


def test_reset_step_uses_old_moments_with_k_1_and_stores_zeros():
    p = torch.nn.Parameter(torch.ones(8))
    opt = StableSPAM([p], lr=1e-3, update_proj_gap=3)
    for t in range(1, 4):
        p.grad = torch.full((8,), 0.1 * t)
        opt.step()
    st = opt.state[p]
    assert st["step"] == 1 and torch.all(st["exp_avg"] == 0) and torch.all(st["exp_avg_sq"] == 0)
    assert [e["optimizer_step"] for e in opt.pop_events()] == [3]


def test_state_dict_keeps_the_global_step():
    _, opt, params = run(lambda g: StableSPAM(g, **HP), 70)
    saved = opt.state_dict()
    assert saved["stable_spam"]["total_steps"] == 70
    full, _, _ = run(lambda g: StableSPAM(g, **HP), 100)
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    again = StableSPAM([{"params": clone}], **HP)
    again.load_state_dict(saved)
    for t in range(71, 101):
        for p, g in zip(clone, gradients(t, clone)):
            p.grad = g
        again.step()
    for a, b in zip(full[-1], clone):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr=-1.0"), (dict(gamma2=1.0), "gamma2"), (dict(total_T=0), "total_T=0"),
    (dict(update_proj_gap=-5), "update_proj_gap=-5"),
])
def test_impossible_hyperparameters_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StableSPAM(make_params(), **kwargs)
