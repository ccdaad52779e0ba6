import math

import pytest

from llmstable.config import ScheduleConfig
from llmstable.schedule import lr_factor


def factors(name, total=100, warmup=10, **kw):
    cfg = ScheduleConfig(name=name, warmup_steps=warmup, **kw)
    return [lr_factor(s, total, cfg) for s in range(total)]


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "wsd"])
def test_warmup_is_linear_to_the_peak(name):
    f = factors(name)
    assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])


def test_cosine_decays_to_the_floor_at_the_last_step():
    f = factors("cosine", min_lr_ratio=0.1)
    assert f[10] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1)
    mid = 10 + (99 - 10) / 2
    assert lr_factor(int(mid), 100, ScheduleConfig("cosine", 10, 0.1)) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_linear_and_constant():
    lin = factors("linear", min_lr_ratio=0.0)
    assert lin[-1] == pytest.approx(0.0) and lin[10] == pytest.approx(1.0)
    assert lin[54] == pytest.approx(1 - 44 / 89)
    assert factors("constant")[10:] == [1.0] * 90


def test_wsd_is_flat_then_decays_over_the_last_fraction():
    f = factors("wsd", min_lr_ratio=0.1, decay_fraction=0.2)
    assert f[10:80] == [1.0] * 70
    assert f[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(f[80:], f[81:]))


def test_zero_warmup_starts_at_the_peak():
    assert factors("cosine", warmup=0)[0] == pytest.approx(1.0)


def test_warmup_fraction_scales_the_warmup_with_the_run():
    """A study's shorter budget runs keep the schedule's shape: the same fraction of steps warms up."""
    cfg = ScheduleConfig("cosine", warmup_steps=50, warmup_fraction=0.1)
    for total in (40, 100, 400):
        f = [lr_factor(s, total, cfg) for s in range(total)]
        warm = round(0.1 * total)
        assert f[:warm] == pytest.approx([(i + 1) / warm for i in range(warm)])
        assert f[warm] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
