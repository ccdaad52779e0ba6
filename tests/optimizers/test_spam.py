import math

import pytest
import torch

from llmstable.optimizers import SPAM
from llmstable.optimizers.spam import spam_clip_active, spam_damping
from reference import ReferenceSPAM
from streams import gradients, make_params, max_diff, run

HP = dict(lr=1e-2, weight_decay=0.1, warmup_steps=20, threshold=50, DeltaT=60, grad_accu_steps=5)


def dense(ps):
    return [{"params": ps}]


def sparse(ps):
    return [{"params": ps[1::2]}, {"params": ps[0::2], "density": 0.5}]


@pytest.mark.parametrize("groups", [dense, sparse], ids=["dense", "density"])
def test_matches_the_reference_over_a_long_run_with_spikes_resets_and_decay(groups):
    ours, opt, _ = run(lambda g: SPAM(g, **HP), 400, groups)
    ref, _, _ = run(lambda g: ReferenceSPAM(g, **HP), 400, groups)
    assert opt.metrics()["stab/spam/resets"] == 6  # t = 60, 120, ..., 360
    assert max_diff(ours, ref) < 1e-6


@pytest.mark.slow
@pytest.mark.subprocess  # (inductor starts its compile workers and the C++ compiler)
def test_compiled_update_matches_the_reference():
    ours, _, _ = run(lambda g: SPAM(g, compiled=True, **HP), 130, sparse)
    ref, _, _ = run(lambda g: ReferenceSPAM(g, **HP), 130, sparse)
    assert max_diff(ours, ref) < 1e-6


def test_without_resets_or_clipping_it_is_adam_with_eps_outside_the_correction():
    """threshold=0, DeltaT=0, eps=0: SPAM must equal torch.optim.Adam (whose eps placement differs only by eps)."""
    ours, _, _ = run(lambda g: SPAM(g, lr=1e-3, eps=0.0, threshold=0, DeltaT=0), 50)
    ref, _, _ = run(lambda g: torch.optim.Adam(g, lr=1e-3, eps=0.0, foreach=False), 50)
    assert max_diff(ours, ref) < 1e-6


def test_damping_is_001_at_the_reset_step_and_1_after_warmup():
    assert spam_damping(0, 150) == pytest.approx(0.01)
    assert spam_damping(75, 150) == pytest.approx(1 - 0.99 * (1 + math.cos(math.pi * 75 / 151)) / 2)
    assert spam_damping(150, 150) == 1.0 and spam_damping(151, 150) == 1.0


def test_clipping_window_follows_grad_accu_steps_after_each_reset():
    active = [t for t in range(1, 130) if spam_clip_active(t, 5000, 20, 50)]
    assert active[0] == 20 and 49 in active and 50 not in active and 69 not in active and 70 in active
    assert not spam_clip_active(100, 0, 20, 50)  # threshold 0 disables
    assert spam_clip_active(100, 5000, 20, 0)  # DeltaT 0: never reset, always past warm-up


def test_momentum_is_zeroed_at_every_multiple_of_delta_t_and_k_keeps_counting():
    p = torch.nn.Parameter(torch.ones(4))
    opt = SPAM([p], lr=1e-3, DeltaT=5, warmup_steps=2)
    for t in range(1, 6):
        p.grad = torch.full((4,), float(t))
        opt.step()
    # at t = 5 the moments restarted from zero: m = (1 - b1) * g, v = (1 - b2) * g^2
    assert torch.allclose(opt.state[p]["exp_avg"], torch.full((4,), 0.1 * 5))
    assert torch.allclose(opt.state[p]["exp_avg_sq"], torch.full((4,), 0.001 * 25))
    assert opt.state[p]["step"] == 5
    assert [e["optimizer_step"] for e in opt.pop_events()] == [5]


def test_a_1000x_spike_is_clipped_to_sqrt_threshold_times_v():
    params = make_params()
    opt = SPAM([{"params": params}], lr=1e-3, threshold=50, DeltaT=1000, grad_accu_steps=2)
    for t in range(1, 10):
        for p, g in zip(params, gradients(t, params, spike_every=10**9)):
            p.grad = g
        opt.step()
    v_before = opt.state[params[0]]["exp_avg_sq"].clone()
    spike = torch.full_like(params[0], 10.0)  # ~1000x the usual 0.01
    params[0].grad = spike
    opt.step()
    b2 = 0.999
    clipped = torch.sqrt(50 * v_before)
    expected_v = b2 * v_before + (1 - b2) * clipped**2
    assert torch.allclose(opt.state[params[0]]["exp_avg_sq"], expected_v)
    assert opt.metrics()["stab/spam/clipped"] >= params[0].numel()


def test_state_dict_round_trip_continues_bit_identically():
    """Masks are redrawn from torch's global RNG (as the official code does), so an exact resume restores that RNG
    too, as the trainer's checkpoints do."""

    def continue_from(opt_state, rng_state, params_state, start, steps):
        params = [torch.nn.Parameter(t.clone()) for t in params_state]
        opt = SPAM([{"params": params[1::2]}, {"params": params[0::2], "density": 0.5}], **HP)
        opt.load_state_dict(opt_state)
        torch.set_rng_state(rng_state)
        for t in range(start, start + steps):
            for p, g in zip(params, gradients(t, params)):
                p.grad = g
            opt.step()
        return params

    full, _, _ = run(lambda g: SPAM(g, **HP), 130, sparse)
    _, opt, params = run(lambda g: SPAM(g, **HP), 55, sparse)
    saved, rng = opt.state_dict(), torch.get_rng_state()
    resumed = continue_from(saved, rng, [p.detach() for p in params], 56, 75)
    for a, b in zip(full[-1], resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr=-1.0"), (dict(betas=(0.9, 1.0)), "betas"), (dict(DeltaT=-1), "DeltaT=-1"),
])
def test_impossible_hyperparameters_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SPAM(make_params(), **kwargs)


def test_density_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="density=1.5"):
        SPAM([{"params": make_params(), "density": 1.5}])
