"""Sweep files and compare.KEY overrides: every bad input is one error naming the key, the value and the fix."""

import subprocess
import sys

import pytest

from llmstable.compose import CONFIG_DIR
from llmstable.config import ConfigError
from llmstable.config.sweep import check_tune, load_sweep


def problems(*args):
    with pytest.raises(ConfigError) as err:
        load_sweep(["compare=quick_cpu", *args], CONFIG_DIR)
    return str(err.value)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIG_DIR / "compare").glob("*.yaml")))
def test_every_sweep_file_loads_with_a_grid_for_every_arm(name):
    sweep, _, arm_files = load_sweep([f"compare={name}"], CONFIG_DIR)
    assert sweep.baseline in sweep.arms
    # a study's budget runs keep the schedule's shape: the warm-up is a share of each run, not a number of steps
    assert any(o.startswith("schedule.warmup_fraction=") for o in sweep.overrides)
    assert not any(o.startswith("schedule.warmup_steps=") for o in sweep.overrides)
    assert not set(sweep.seeds) & set(sweep.confirm_seeds)
    grids = {arm: sweep.grid_of(arm, arm_files[arm])[0] for arm in sweep.arms}
    if sweep.models:  # a study across sizes (the proxy study): the LR sweep spans 1e-3 to 3e-1 in half decades, the
        # arms outside it run at its two highest LRs; one seed and no budget runs, which its report says
        assert len(sweep.models) >= 3 and grids[sweep.baseline] == [0.001, 0.003, 0.01, 0.03, 0.1, 0.3]
        assert all(grid == grids[sweep.baseline] or grid == [0.1, 0.3] for grid in grids.values())
        return
    assert all(len(grid) >= 3 for grid in grids.values()), name
    assert len(sweep.judged_seeds) >= 2 and len(sweep.budget_fractions) >= 3


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
    (["compare.seeds=[0,1]", "compare.confirm_seeds=[1,2]"],
     "compare.confirm_seeds=[1, 2] shares [1] with compare.seeds=[0, 1]: the seeds an arm is judged on must be fresh"),
    (["compare.confirm_seeds=[4,4]"], "compare.confirm_seeds=[4, 4] repeats a seed"),
    (["compare.confirm_seeds=[a]"], "compare.confirm_seeds=['a'] must be a list of integers"),
    (["compare.parallel=0"], "compare.parallel=0 must be >= 1"),
    (["compare.seeds=abc"], "compare.seeds=abc: "),
    (["compare.nope=1"], "compare.nope=1: "),
    (["compare.models=[proxy_1m,proxy_10m]"], "compare.models has 'proxy_10m', which is not in configs/model/ (did you "
                                              "mean 'proxy_1m'?)"),
    (["compare.models=[proxy_1m,proxy_1m]"], "compare.models=['proxy_1m', 'proxy_1m'] repeats a size"),
    (["compare.models=[proxy_1m]"], "model=tiny_1m chooses one model but compare.models=['proxy_1m'] runs the study "
                                    "at each of those sizes"),
])
def test_bad_sweep_input_names_the_key_the_value_and_the_fix(args, expected):
    assert expected in problems(*args)


def test_a_study_across_sizes_refuses_a_model_override():
    with pytest.raises(ConfigError) as err:
        load_sweep(["compare=proxies_cpu", "model=tiny_10m"], CONFIG_DIR)
    assert ("model=tiny_10m chooses one model but compare.models=['proxy_100k', 'proxy_300k', 'proxy_1m']"
            in str(err.value))


@pytest.mark.subprocess
def test_the_cli_prints_the_error_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llmstable.cli", "compare", "compare=quick_cpu",
                             "compare.arms=[adamw,nope]", "compare.budget_fractions=[-1]",
                             f"compare.sweep_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "compare.arms has 'nope'" in result.stderr and "compare.budget_fractions=[-1]" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("tune,expected", [
    ({"train.max_norm": [0.1, 0.1]}, "train.max_norm=[0.1, 0.1] repeats a value"),
    ({"train.max_nrom": [0.1]}, "names 'train.max_nrom', which is not a config key (did you mean 'train.max_norm'?)"),
    ({"optimizer.lr": [0.1]}, "the LR is always tuned, over lr_grid"),
    ({"train.max_norm": []}, "train.max_norm=[] must be a non-empty list of values"),
    ({"train.max_norm": [[0.1], 0.2]}, "must list plain values (numbers, strings, booleans)"),
    ({"train.max_norm": [0.1], "train.seed": [0]}, "must map one config key to the values to try"),
])
def test_a_bad_tune_in_an_arm_file_names_the_file_key_and_fix(tune, expected):
    found = []
    check_tune(found, "adamw_clip", {"tune": tune})
    assert len(found) == 1 and expected in found[0] and "configs/arm/adamw_clip.yaml" in found[0]


def test_the_budget_runs_warm_up_for_the_same_share_of_their_steps(tmp_path):
    """A sweep that gives the warm-up in steps: its budget runs get that share of their own steps (15 of the full
    run's 123 steps: 12.2%), so a quarter of the budget is the same schedule, shorter."""
    from llmstable.compare import budget_overrides
    from llmstable.compose import compose_config

    sweep, overrides, _ = load_sweep(["compare=quick_cpu", "schedule.warmup_fraction=null",
                                      "schedule.warmup_steps=15"], CONFIG_DIR)
    key, values, shape = budget_overrides(sweep, overrides, tmp_path)
    assert key == "train.budget_tokens" and values == ["62500", "125000"] and shape == (
        f"schedule.warmup_fraction={15 / 123!r}",)
    from llmstable.schedule import warmup_steps

    for tokens, want in (("62500", 4), ("125000", 8), ("250000", 15)):  # 3.78, 7.56 and 15 rounded
        cfg = compose_config([*sweep.overrides, *overrides, "arm=adamw", *shape, f"train.budget_tokens={tokens}"],
                             run_dir=tmp_path / tokens)
        assert warmup_steps(cfg.total_steps, cfg.schedule) == want
    # Stable-SPAM's total_T=auto follows each run's own steps (llmstable.optimizers.build_optimizer).
    quarter = compose_config([*sweep.overrides, "arm=stable_spam", "train.budget_tokens=62500"], run_dir=tmp_path / "q")
    assert quarter.optimizer.total_T == "auto" and quarter.total_steps == 31
    _, _, none = budget_overrides(load_sweep(["compare=quick_cpu"], CONFIG_DIR)[0], [], tmp_path)
    assert none == ()  # quick_cpu gives the share itself


def test_tuned_values_are_checked_and_rendered_as_the_runs_config_holds_them(tmp_path):
    from llmstable.compare import render_tuned, tune_launch

    sweep, overrides, arm_files = load_sweep(["compare=quick_cpu", "compare.arms=[adamw,adamw_clip]"], CONFIG_DIR)
    files = {**arm_files, "adamw_clip": {"tune": {"train.max_norm": [1, 0.5]}}}
    rendered = render_tuned(sweep, overrides, tmp_path, files)
    assert rendered == {"adamw_clip": ("train.max_norm", ["1.0", "0.5"])}  # a float key: Hydra names the run 1.0
    assert tune_launch("adamw_clip", rendered, only=0.5) == {
        "extra": ("train.max_norm=0.5",), "tag": "_max_norm${train.max_norm}", "tags": ("_max_norm0.5",)}
    assert tune_launch("adamw", rendered) == {}
    with pytest.raises(ConfigError, match="max_norm"):
        render_tuned(sweep, overrides, tmp_path, {**arm_files, "adamw_clip": {"tune": {"train.max_norm": [-1]}}})
