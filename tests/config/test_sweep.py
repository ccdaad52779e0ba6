"""Sweep files and compare.KEY overrides: every bad input is one error naming the key, the value and the fix."""

import subprocess
import sys

import pytest

from llmstable.compose import CONFIG_DIR
from llmstable.config import ConfigError
from llmstable.config.sweep import load_sweep


def problems(*args):
    with pytest.raises(ConfigError) as err:
        load_sweep(["compare=quick_cpu", *args], CONFIG_DIR)
    return str(err.value)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIG_DIR / "compare").glob("*.yaml")))
def test_every_sweep_file_loads_with_a_grid_for_every_arm(name):
    sweep, _, arm_files = load_sweep([f"compare={name}"], CONFIG_DIR)
    assert sweep.baseline in sweep.arms
    for arm in sweep.arms:
        grid, _ = sweep.grid_of(arm, arm_files[arm])
        assert len(grid) >= 3, (name, arm)
    assert len(sweep.seeds) >= 2 and len(sweep.budget_fractions) >= 3


def test_every_arm_file_has_an_lr_grid():
    _, _, arm_files = load_sweep(["compare=quick_cpu"], CONFIG_DIR)
    assert all(len(f.get("lr_grid") or []) >= 3 for f in arm_files.values())


@pytest.mark.parametrize("args,expected", [
    (["compare.arms=[adamw,adamx]"], "compare.arms has 'adamx', which is not in configs/arm/ (did you mean 'adamw'?)"),
    (["compare.lrs=[0.001,-1]"], "compare.lrs=[0.001, -1] must be a non-empty list of LRs > 0"),
    (["compare.grids.muon=[]"], "compare.grids.muon=[] must be a non-empty list of LRs > 0"),
    (["compare.grids.lion=[0.001]"], "compare.grids has 'lion', which is not in compare.arms"),
    (["compare.budget_fractions=[0.5,0]"], "compare.budget_fractions=[0.5, 0] must be numbers > 0"),
    (["compare.baseline=lion"], "compare.baseline='lion' is not one of compare.arms"),
    (["compare.seeds=[0,0]"], "compare.seeds=[0, 0] repeats a seed"),
    (["compare.parallel=0"], "compare.parallel=0 must be >= 1"),
    (["compare.seeds=abc"], "compare.seeds=abc: "),
    (["compare.nope=1"], "compare.nope=1: "),
])
def test_bad_sweep_input_names_the_key_the_value_and_the_fix(args, expected):
    assert expected in problems(*args)


def test_the_cli_prints_the_error_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llmstable.cli", "compare", "compare=quick_cpu",
                             "compare.arms=[adamw,nope]", "compare.budget_fractions=[-1]",
                             f"compare.sweep_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "compare.arms has 'nope'" in result.stderr and "compare.budget_fractions=[-1]" in result.stderr
    assert "Traceback" not in result.stderr
