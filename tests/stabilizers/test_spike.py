"""The spike detector and guard on synthetic metric streams."""

import math
import random

import pytest

from llmstable.config import SpikeGuardConfig
from llmstable.stabilizers.spike import SpikeDetector, SpikeGuard


def noisy(n, mean=3.0, sd=0.05, seed=0):
    rng = random.Random(seed)
    return [mean + rng.gauss(0, sd) for _ in range(n)]


def feed(detector, values):
    flagged = []
    for i, v in enumerate(values):
        if detector.check(v) is None:
            detector.record(v)
        else:
            flagged.append(i)
    return flagged


def test_quiet_stream_has_no_spikes_and_an_outlier_is_caught():
    d = SpikeDetector(window=64, k_std=6, min_history=16)
    stream = noisy(200)
    assert feed(d, stream) == []
    rule, threshold = d.check(3.0 + 20 * 0.05)
    assert rule == "window" and 3.0 < threshold < 4.0


def test_inactive_until_min_history_except_for_non_finite():
    d = SpikeDetector(min_history=10)
    assert d.check(1e9) is None  # no history yet: no judgement
    assert d.check(math.nan)[0] == "non_finite" and d.check(math.inf)[0] == "non_finite"


def test_spikes_never_enter_the_history():
    d = SpikeDetector(window=32, min_history=8)
    stream = noisy(50)
    stream[30] = 100.0
    assert feed(d, stream) == [30]
    assert max(d.state_dict()["history"]) < 4.0


def test_ema_ratio_catches_a_jump_the_window_rule_allows():
    d = SpikeDetector(window=8, k_std=1000, min_history=4, ema_decay=0.5, ema_ratio=2.0)
    assert feed(d, [1.0, 1.02, 0.98, 1.01, 0.99]) == []
    assert d.check(2.5)[0] == "ema_ratio"


def test_state_round_trip_keeps_the_detector_warm():
    d = SpikeDetector(window=32, min_history=16)
    feed(d, noisy(40))
    warm = SpikeDetector(window=32, min_history=16)
    warm.load_state_dict(d.state_dict())
    assert warm.check(10.0) == d.check(10.0) and warm.check(10.0) is not None
    assert warm.check(3.01) is None


def guard(**kw):
    return SpikeGuard(SpikeGuardConfig(min_history=8, window=16, **kw))


def test_ladder_skip_then_rollback_then_lr_cut_and_moment_reset_then_abort():
    g = guard(skip_steps=1, lr_cut_after=2, moment_reset_after=3, max_rollbacks=3)
    for i, v in enumerate(noisy(20)):
        assert g.check_step(i, {"loss": v, "grad_norm": 1.0}, 0) is None
    spike = {"loss": 50.0, "grad_norm": 1.0}
    assert g.check_step(21, spike, 0).kind == "skip_step"
    first = g.check_step(22, spike, 0)
    assert first.kind == "rollback" and not first.lr_cut and not first.moment_reset
    assert first.detections[0].metric == "loss" and first.detections[0].rule == "window"
    second = g.check_step(23, spike, 1)
    assert second.lr_cut and not second.moment_reset
    third = g.check_step(24, spike, 2)
    assert third.lr_cut and third.moment_reset
    assert g.check_step(25, spike, 3).kind == "abort"


def test_a_clean_step_resets_the_skip_budget_and_grad_norm_is_watched():
    g = guard(skip_steps=1)
    for v in noisy(20):
        g.check_step(0, {"loss": v, "grad_norm": 1.0 + v / 100}, 0)
    assert g.check_step(21, {"loss": 3.0, "grad_norm": 500.0}, 0).kind == "skip_step"
    assert g.check_step(22, {"loss": 3.0, "grad_norm": 1.03}, 0) is None
    action = g.check_step(23, {"loss": 3.0, "grad_norm": 500.0}, 0)
    assert action.kind == "skip_step" and action.detections[0].metric == "grad_norm"


def test_guard_state_round_trip():
    g = guard()
    for v in noisy(20):
        g.check_step(0, {"loss": v, "grad_norm": 1.0}, 0)
    again = guard()
    again.load_state_dict(g.state_dict())
    assert again.check_step(0, {"loss": 50.0, "grad_norm": 1.0}, 0).kind == "skip_step"


def test_config_validation_names_the_key(tmp_path):
    from llmstable.compose import compose_config
    from llmstable.config import ConfigError

    with pytest.raises(ConfigError, match="stabilizer.spike_guard.lr_cut_factor=2.0"):
        compose_config(["stabilizer=[spike_guard]", "stabilizer.spike_guard.lr_cut_factor=2.0"], run_dir=tmp_path)
