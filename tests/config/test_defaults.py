"""One source for every default: the typed schema (llmstable/config/). The YAML group files only choose and change
values, so a config built without them (a script, a notebook) runs what the CLI runs."""

import dataclasses
import typing

import pytest
from omegaconf import OmegaConf

from llmstable.compose import CONFIG_DIR, compose_config
from llmstable.config import (
    DataConfig, DistributedConfig, FaultConfig, LossConfig, ModelConfig, OptimizerConfig, ScheduleConfig,
    StabilizerConfig, TokenizerConfig, load_config, to_dict,
)
from llmstable.stabilizers.spike import SpikeDetector


def schema_of(group, name, values):
    if group == "optimizer":
        return OptimizerConfig.variant(values["name"])
    if group == "loss":
        return LossConfig.variant(values["name"])
    if group == "stabilizer":
        hint = typing.get_type_hints(StabilizerConfig)[name]
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return {"model": ModelConfig, "data": DataConfig, "schedule": ScheduleConfig, "fault": FaultConfig,
            "distributed": DistributedConfig}[group]


def defaults(cls):
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return {k: to_dict(v) if dataclasses.is_dataclass(v) else list(v) if isinstance(v, tuple) else v
            for k, v in out.items()}


GROUP_FILES = [(g, p.stem) for g in ("model", "data", "optimizer", "schedule", "stabilizer", "fault", "distributed",
                                     "loss")
               for p in sorted((CONFIG_DIR / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,name", GROUP_FILES)
def test_no_group_file_repeats_a_schema_default(group, name):
    values = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / group / f"{name}.yaml")) or {}
    cls = schema_of(group, name, values)
    own = defaults(cls)
    repeated = [k for k, v in values.items() if k != "name" and not isinstance(v, dict) and k in own and v == own[k]]
    if isinstance(values.get("tokenizer"), dict):
        tok = defaults(TokenizerConfig)
        repeated += [f"tokenizer.{k}" for k, v in values["tokenizer"].items() if v == tok.get(k, object())]
    assert not repeated, f"configs/{group}/{name}.yaml repeats the schema's defaults for {repeated}: delete them"


def test_the_cli_default_is_the_schema_default_plus_the_default_model(tmp_path):
    """What `llmstable train` runs with no overrides equals the dataclasses' defaults; the only value the YAML
    adds is the choice of model (tiny_1m's shape)."""
    cli = to_dict(compose_config([], run_dir=tmp_path))
    model = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / "tiny_1m.yaml"))
    bare = to_dict(load_config({"run_dir": str(tmp_path), "model": model}))
    assert cli == bare


def test_the_spike_detector_takes_its_defaults_from_the_schema():
    from llmstable.config import SpikeGuardConfig

    guard, detector = SpikeGuardConfig(), SpikeDetector()
    for key in ("window", "k_std", "min_history", "ema_decay", "ema_ratio"):
        assert getattr(detector, key) == getattr(guard, key)


@pytest.mark.parametrize("override,expected", [
    ("optimizer.lr=1e-3", ("optimizer", "lr", 1e-3)),
    ("optimizer=spam", ("optimizer", "DeltaT", 500)),
    ("stabilizer=[spike_guard]", ("stabilizer", "spike_guard", "k_std", 6.0)),
])
def test_keys_the_files_leave_out_can_still_be_overridden(tmp_path, override, expected):
    cfg = compose_config([override], run_dir=tmp_path)
    value = cfg
    for part in expected[:-1]:
        value = getattr(value, part)
    assert value == expected[-1]
