"""Composing the run's config from the Hydra tree in `configs/`: the same composition `llmstable train` runs,
as a library function for tests, notebooks, scripts and the compare command.

    cfg = compose_config(["model=tiny_10m", "optimizer.lr=3e-3"], run_dir="runs/x")

Before Hydra composes, every override is checked on its own, so that each problem names its override: an unknown
key (with the valid keys beside it), an option that is not in its group (with the group's options), a value that
does not parse. The typed config then validates itself once (llmstable.config).

The typed schema is the one source of defaults: the YAML group files only choose and change values, so a key
the files leave out is not in Hydra's composed config. Overrides of schema keys are therefore handed to Hydra as
`++key=value` (set or add); a key of a stabilizer must still have that stabilizer chosen, or the override would
switch it on unasked.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from llmstable.config import ConfigError, TrainConfig, load_config, schema_keys

CONFIG_DIR = Path(os.environ.get("LLMSTABLE_CONFIG_DIR", Path(__file__).resolve().parent.parent / "configs"))
GROUPS = ("model", "data", "optimizer", "schedule", "loss", "stabilizer", "fault", "distributed", "arm", "experiment")


def register_resolvers() -> None:
    """The `llmstable_or` interpolation of configs/train.yaml, and the typed schema (`llmstable_schema` in Hydra's
    ConfigStore: `llmstable train --config-name llmstable_schema --cfg job` prints every key and default)."""
    from omegaconf import OmegaConf

    from llmstable.config import register_schemas

    register_schemas()

    if not OmegaConf.has_resolver("llmstable_or"):
        OmegaConf.register_new_resolver("llmstable_or", lambda value, default: value if value is not None else default)


# Hydra's flags that take the next argument as their value (`hydra --help`); `--info` takes one optionally and is
# written `--info=WHAT` here.
HYDRA_VALUE_FLAGS = frozenset({"--cfg", "-c", "--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd",
                               "--package", "-p", "--experimental-rerun"})


def check_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(problems, the overrides Hydra may compose). Each problem names its override: one that does not parse, a
    group option that does not exist (with the group's options), a key the schema does not know (with the valid
    keys beside it; Hydra alone would not list them). `+key`, `~key` and `hydra.*` keys are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    valid = set(schema_keys(TrainConfig))
    prefixes = {k.rsplit(".", 1)[0] for k in valid if "." in k} | set(GROUPS)
    problems, kept = [], []
    flag_value = False  # the item is the value of the Hydra flag before it (`--cfg job`, `-cn NAME`)
    for item in overrides:
        if flag_value or item.startswith(("-", "hydra.", "hydra/")):
            kept.append(item)
            flag_value = item in HYDRA_VALUE_FLAGS and not flag_value
            continue
        try:
            override = parser.parse_override(item)
        except Exception as err:  # noqa: BLE001  (Hydra's parse errors come as several kinds)
            problems.append(f"the override {item!r} does not parse ({err}): check its brackets and quotes, e.g. "
                            "'optimizer.betas=[0.9,0.95]', and quote the whole override in the shell")
            continue
        key = override.key_or_group
        if key in GROUPS:
            problem = _group_problem(item, key, override)
        elif override.is_add() or override.is_delete() or override.is_force_add():
            problem = None
        elif key in valid or key in prefixes:
            problem, item = None, f"++{item}"  # (the key may be absent: its default lives in the schema)
        else:
            problem = _unknown_key(key, valid)
        if problem is None:
            kept.append(item)
        else:
            problems.append(problem)
    return problems, kept


def _unselected_stabilizers(kept: list[str], compose) -> list[str]:
    """Problems for `stabilizer.NAME.KEY=...` overrides whose stabilizer the rest of the config does not choose."""
    stray = [o for o in kept if o.lstrip("+").startswith("stabilizer.") and o.lstrip("+").count(".") >= 2]
    if not stray:
        return []
    chosen = compose([o for o in kept if o not in stray]).get("stabilizer") or {}
    problems = []
    for item in stray:
        name = item.lstrip("+").split(".")[1]
        if name not in chosen:
            problems.append(f"{item.lstrip('+')} sets a key of the {name} stabilizer, which is not chosen: add it to "
                            f"the stabilizer list, e.g. stabilizer=[{','.join([*chosen, name])}]")
    return problems


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _group_problem(item: str, group: str, override) -> str | None:
    if override.is_delete():
        return None
    if override.is_sweep_override():  # -m group=a,b: every option of the sweep
        chosen = list(override.sweep_string_iterator())
    else:
        value = override.value()
        chosen = value if isinstance(value, list) else [value]
    options = group_options(group)
    wrong = [v for v in chosen if v is not None and (not isinstance(v, str) or v not in options)]
    if not wrong:
        return None
    return (f"{item}: {', '.join(repr(w) for w in wrong)} {'is not an option' if len(wrong) == 1 else 'are not options'}"
            f" of the {group} group; options: {', '.join(options)} (files in configs/{group}/)")


def _unknown_key(key: str, valid: set[str]) -> str:
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = sorted(k for k in valid if k.rsplit(".", 1)[0] == parent) if parent else sorted(
        {k.split(".")[0] for k in valid})
    near = difflib.get_close_matches(key, sorted(valid) + list(GROUPS), n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    return f"unknown config key {key!r}{hint}; valid keys here: {', '.join(siblings)}"


def compose_config(overrides: list[str], run_dir: str | Path | None = None) -> TrainConfig:
    """The typed config `llmstable train OVERRIDES` would run, composed with Hydra's compose API (for tests,
    notebooks and scripts). run_dir, if given, overrides the config's. Raises one ConfigError listing every
    problem."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    problems, kept = check_overrides(overrides)
    register_resolvers()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            def composed(items: list[str]) -> dict:
                return OmegaConf.to_container(compose(config_name="train", overrides=items), resolve=True)

            container = composed(kept)
            problems += _unselected_stabilizers(kept, composed)
    except (HydraException, ValueError) as err:  # (OmegaConf's errors are ValueErrors)
        raise ConfigError([*problems, f"the overrides {' '.join(kept)!r} do not compose: {err}"]) from err
    container.pop("hydra", None)
    if run_dir is not None:
        container["run_dir"] = str(run_dir)
    try:
        cfg = load_config(container)
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems)
    return cfg
