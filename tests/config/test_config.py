"""Every config file composes and builds; every bad input gets an error naming the key."""

import re

import pytest
import torch

from llmstable.compose import CONFIG_DIR, compose_config
from llmstable.config import ConfigError, load_config
from llmstable.model import Llama, llama_config


def options(group):
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("name", options("model"))
def test_every_model_file_composes_and_builds(name, tmp_path):
    cfg = compose_config([f"model={name}"], run_dir=tmp_path)
    with torch.device("meta"):
        model = Llama(llama_config(cfg.model, 4096))
    assert model.num_params() > 0


@pytest.mark.parametrize("group", ["data", "optimizer", "schedule", "loss", "fault", "experiment", "arm"])
def test_every_group_option_composes_and_validates(group, tmp_path):
    for name in options(group):
        overrides = [f"{group}={name}"] + (["data.path=corpus/*.txt"] if name == "local_files" else [])
        cfg = compose_config(overrides, run_dir=tmp_path)
        if group in ("data", "optimizer", "schedule", "loss"):
            assert getattr(cfg, group).name == name
        if group == "fault":
            assert cfg.fault.active() == (name != "none")
        if group == "arm":
            assert cfg.name == name
        if group == "experiment":  # (demo_warning waits for a spike of its own: no fault)
            assert cfg.stabilizer.spike_guard is not None and (cfg.fault.active() or name == "demo_warning")


def test_the_schema_lists_every_key_of_the_main_config(tmp_path):
    from llmstable.config import TrainConfig, schema_keys

    keys = schema_keys(TrainConfig)
    assert "model.dim" in keys and "data.tokenizer.kind" in keys and "train.budget_tokens" in keys


def check_error(overrides, *patterns, tmp_path):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides, run_dir=tmp_path)
    for pattern in patterns:
        assert pattern in str(err.value), str(err.value)
    return str(err.value)


def test_unknown_key_lists_valid_keys_and_suggests_one(tmp_path):
    check_error(["train.max_step=5"], "train.max_step", "did you mean train.max_steps", "train.micro_batch_size",
                tmp_path=tmp_path)


def test_unknown_key_added_with_plus_is_caught_by_validation(tmp_path):
    check_error(["+model.hidden=5"], "unknown key model.hidden", "valid keys:", "dim", tmp_path=tmp_path)


def test_unknown_group_option_lists_the_valid_ones(tmp_path):
    check_error(["model=llama_7b"], "model=llama_7b: 'llama_7b' is not an option of the model group; options: "
                "llama_130m, llama_1b, llama_350m, llama_60m, proxy_100k, proxy_1m, proxy_300k, tiny_10m, tiny_1m",
                tmp_path=tmp_path)
    # In a list, the wrong option is named, with every option of the group.
    check_error(["stabilizer=[zloss,foo]"], "stabilizer=[zloss,foo]: 'foo' is not an option of the stabilizer "
                "group; options: emb_grad_shrink, norm_growth_limiter, orthograd, qk_clip, qk_norm, quant4, "
                "softmax_collapse, spike_guard, update_clip, zloss", tmp_path=tmp_path)


def test_an_override_that_does_not_parse_is_named(tmp_path):
    check_error(["optimizer.betas=[0.9,"], "the override 'optimizer.betas=[0.9,' does not parse", tmp_path=tmp_path)


def test_hydra_flags_and_their_values_pass_the_override_check():
    """A flag's value (`--cfg job`, `-cn train`) is not an override: the check passes it to Hydra with its flag, and
    still checks the overrides after it."""
    from llmstable.compose import check_overrides

    problems, kept = check_overrides(["--cfg", "job", "-cn", "train", "train.max_steps=3", "train.max_step=3"])
    assert kept == ["--cfg", "job", "-cn", "train", "++train.max_steps=3"]
    assert len(problems) == 1 and "train.max_step" in problems[0]


def test_heads_must_divide_hidden(tmp_path):
    check_error(["model.dim=130", "model.n_heads=4"], "model.dim=130 is not divisible by model.n_heads=4",
                tmp_path=tmp_path)


def test_batch_sizes_must_divide(tmp_path):
    check_error(["train.global_batch_size=10", "train.micro_batch_size=4"],
                "train.global_batch_size=10 is not divisible by train.micro_batch_size=4", "[1, 2, 5, 10]",
                tmp_path=tmp_path)


def test_seq_len_longer_than_the_model(tmp_path):
    check_error(["data.seq_len=512", "model.max_seq_len=256"], "data.seq_len=512 is longer than model.max_seq_len=256",
                tmp_path=tmp_path)


def test_validation_collects_every_problem_and_raises_once(tmp_path):
    msg = check_error(["model.dim=130", "train.micro_batch_size=3", "optimizer.lr=-1", "schedule.name=step"],
                      "model.dim", "train.global_batch_size", "optimizer.lr=-1", "schedule.name='step'",
                      tmp_path=tmp_path)
    assert msg.count("\n  - ") == 4


def test_wrong_types_name_the_key(tmp_path):
    check_error(["train.seed=abc"], "train.seed='abc' must be a whole number, e.g. train.seed=100", tmp_path=tmp_path)


@pytest.mark.parametrize("section, values", [
    ("optimizer", {"lr": float("inf")}), ("optimizer", {"weight_decay": float("nan")}),
    ("optimizer", {"betas": [0.9, float("inf")]}), ("optimizer", {"name": "spam", "threshold": float("-inf")}),
    ("train", {"max_norm": float("nan")}), ("data", {"val_fraction": float("inf")}),
    ("schedule", {"min_lr_ratio": float("nan")}), ("fault", {"loss_scale": float("inf")}),
    ("optimizer", {"lr": 10**400}),
])
def test_a_float_key_refuses_inf_and_nan(section, values):
    # inf was accepted and the run "diverged" at step 2 with exit 0; nan slipped through every `<= 0` check.
    raw = {"run_dir": "x", "train": {"max_steps": 3, "budget_tokens": None}}
    raw.setdefault(section, {}).update(values)
    key = next(k for k in values if k != "name")
    shown = f"{section}.{key}" + ("[1]" if key == "betas" else "")
    with pytest.raises(ConfigError, match=rf"{re.escape(shown)}=(-?inf|nan) must be a finite number: inf and nan "):
        load_config(raw)


def test_budget_needs_exactly_one_of_tokens_or_steps(tmp_path):
    check_error(["train.max_steps=10"], "are both set: keep one and null the other", tmp_path=tmp_path)
    check_error(["train.budget_tokens=null"], "set one of them, e.g. train.budget_tokens=2000000 or "
                "train.max_steps=1000", tmp_path=tmp_path)


def test_required_path_for_local_files(tmp_path):
    check_error(["data=local_files"], "data.path is required", tmp_path=tmp_path)


def test_load_config_accepts_a_plain_dict_with_defaults():
    cfg = load_config({"run_dir": "x", "train": {"max_steps": 3, "budget_tokens": None}})
    assert cfg.total_steps == 3 and cfg.grad_accum_steps == 2


def test_total_steps_rounds_the_token_budget_up(tmp_path):
    cfg = compose_config(["train.budget_tokens=1000", "data.seq_len=64", "train.global_batch_size=4",
                          "train.micro_batch_size=4"], run_dir=tmp_path)
    assert cfg.tokens_per_step == 256 and cfg.total_steps == 4


def test_unknown_keys_and_bad_values_are_reported_together(tmp_path):
    msg = check_error(["train.max_step=5", "model.n_heads=3"], "train.max_step", "model.n_heads=3",
                      tmp_path=tmp_path)
    assert msg.count("\n  - ") == 2


@pytest.mark.parametrize("name", options("compare"))
def test_every_sweep_file_loads_and_its_shared_overrides_compose(name, tmp_path):
    from llmstable.compare import load_sweep

    sweep, extra, _ = load_sweep([f"compare={name}"], CONFIG_DIR)
    assert sweep.name == name and sweep.arms and extra == []
    sizes = [[f"model={m}"] for m in sweep.models] or [[]]  # a study across sizes composes at each of them
    for arm in sweep.arms:
        for size in sizes:
            cfg = compose_config([*sweep.overrides, *size, f"arm={arm}"], run_dir=tmp_path)
            assert cfg.name == arm


def test_unknown_sweep_or_arm_is_refused_with_the_options():
    from llmstable.compare import load_sweep

    with pytest.raises(ConfigError, match="quick_cpu"):
        load_sweep(["compare=nope"], CONFIG_DIR)
    with pytest.raises(ConfigError, match=r"compare.arms has 'nadam'.*stable_spam"):
        load_sweep(["compare=quick_cpu", "compare.arms=[adamw,nadam]"], CONFIG_DIR)


def test_the_diagnostics_keys_are_checked_with_the_key_and_the_fix(tmp_path):
    guard = "stabilizer=[spike_guard]"
    check_error([guard, "stabilizer.spike_guard.watch=[loss,precnd]"], "stabilizer.spike_guard.watch has 'precnd'",
                "allowed: loss, grad_norm, precond, precond_curvature", tmp_path=tmp_path)
    renamed = compose_config([guard, "stabilizer.spike_guard.metrics=[loss]"], run_dir=tmp_path)  # the former name
    assert renamed.stabilizer.spike_guard.watch == ["loss"] and renamed.stabilizer.spike_guard.metrics is None
    check_error([guard, "stabilizer.spike_guard.watch=[precond]"], "watches neither loss nor grad_norm",
                tmp_path=tmp_path)
    check_error([guard, "optimizer=s3", "stabilizer.spike_guard.watch=[loss,precond]"], "optimizer=s3",
                "adamw, spam, stable_spam", tmp_path=tmp_path)
    check_error([guard, "distributed=fsdp2", "stabilizer.spike_guard.watch=[loss,precond_curvature]"],
                "distributed=fsdp2", tmp_path=tmp_path)
    ddp = compose_config([guard, "distributed=ddp", "stabilizer.spike_guard.watch=[loss,precond_curvature]"],
                         run_dir=tmp_path)  # under DDP the ranks average the predictor's gradient and product
    assert ddp.stabilizer.spike_guard.watch == ["loss", "precond_curvature"]
    check_error([guard, "stabilizer.spike_guard.warn_lr_factor=2"], "warn_lr_factor=2.0 must be in (0, 1]",
                tmp_path=tmp_path)
    check_error([guard, "stabilizer.spike_guard.max_sdc=0"], "stabilizer.spike_guard.max_sdc=0 must be > 0",
                tmp_path=tmp_path)
    check_error(["fault.sdc_at_step=3", "fault.sdc_layer=9"], "fault.sdc_layer=9", "choose 0 to 3", tmp_path=tmp_path)
    check_error(["loss=spherical_z", "loss.a=0"], "loss.a=0.0 must be > 0", tmp_path=tmp_path)
    check_error(["loss=stablemax", "loss.a=1"], "unknown key loss.a", tmp_path=tmp_path)
    check_error(["loss=softmax"], "'softmax' is not an option of the loss group", "stablemax", tmp_path=tmp_path)
