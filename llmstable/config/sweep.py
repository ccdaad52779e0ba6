"""The `compare` sweep files' schema (`configs/compare/*.yaml`, overridden with `compare.KEY=VALUE`): which arms,
each arm's LR grid, the seeds the LRs are chosen on and those the arms are judged on, the baseline and its
budgets. `load_sweep` merges and validates once, listing every problem with the key, the bad value and the fix."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from llmstable.config.checks import ConfigError


@dataclass
class SweepConfig:
    """A sweep file's fields."""

    name: str = "sweep"
    arms: list = field(default_factory=list)  # names in configs/arm/
    baseline: str = "adamw"  # the arm the others are compared with (paired differences, speedup)
    lrs: list | None = None  # one LR grid for every arm; null: each arm's own lr_grid (configs/arm/)
    grids: dict = field(default_factory=dict)  # arm -> its LR grid, over lrs and the arm file's lr_grid
    extend_grid: bool = False  # add the next LR past each grid edge the best LR sits on, run only what is missing
    seeds: list = field(default_factory=lambda: [0])  # the seeds each arm's grid runs on: its LR is chosen on them
    confirm_seeds: list = field(default_factory=list)  # fresh seeds each arm is judged on at its chosen LR; []:
    # judged on the grid's own runs (the report then says that the choice and the judgement share them)
    budget_fractions: list = field(default_factory=lambda: [0.25, 0.5, 1.0])  # the baseline's budgets for L(D)
    target_loss: float | None = None  # the report's "tokens to reach" this validation loss
    parallel: int = 1  # runs at a time (the joblib launcher when > 1)
    threads_per_run: int | None = None  # torch threads per run; null: 1 when parallel > 1, else torch's default
    overrides: list = field(default_factory=list)  # train overrides every arm shares
    sweep_dir: str | None = None  # null: runs/compare/NAME
    # model sizes (configs/model/) the whole study runs at, each in its own subdirectory SWEEP_DIR/SIZE with its own
    # report, and a report across sizes at the top (llmstable.report.proxy_page); empty: the overrides' one model
    models: list = field(default_factory=list)

    def validate(self, problems: list[str], arm_files: dict[str, dict], model_files: tuple = ()) -> None:
        known = sorted(arm_files)
        for arm in self.arms:
            if arm not in arm_files:
                near = difflib.get_close_matches(str(arm), known, n=1)
                problems.append(f"compare.arms has {arm!r}, which is not in configs/arm/"
                                f"{f' (did you mean {near[0]!r}?)' if near else ''}: choose from {', '.join(known)}")
        if not self.arms:
            problems.append("compare.arms is empty: list arms from configs/arm/, e.g. compare.arms=[adamw,muon]")
        elif self.baseline not in self.arms:
            problems.append(f"compare.baseline={self.baseline!r} is not one of compare.arms {list(self.arms)}: add "
                            "it to compare.arms or set compare.baseline to one of them")
        for arm in self.grids:
            if arm not in self.arms:
                problems.append(f"compare.grids has {arm!r}, which is not in compare.arms {list(self.arms)}: "
                                "remove it or add the arm")
        for arm in self.arms:
            if arm in arm_files:
                self.check_grid(problems, arm, arm_files[arm])
                check_tune(problems, arm, arm_files[arm])
        fractions = self.budget_fractions
        if not all(positive_number(f) for f in fractions):
            problems.append(f"compare.budget_fractions={list(fractions)} must be numbers > 0 (fractions of the "
                            "budget, 1.0 = the grid runs' own), e.g. [0.25,0.5,1.0]")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds) or not self.seeds:
            problems.append(f"compare.seeds={list(self.seeds)} must be a non-empty list of integers, e.g. [0,1]")
        elif len(set(self.seeds)) != len(self.seeds):
            problems.append(f"compare.seeds={list(self.seeds)} repeats a seed: list each once")
        confirm = self.confirm_seeds
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in confirm):
            problems.append(f"compare.confirm_seeds={list(confirm)} must be a list of integers, e.g. [1,2,3], or [] "
                            "to judge on the grid's own seeds")
        elif len(set(confirm)) != len(confirm):
            problems.append(f"compare.confirm_seeds={list(confirm)} repeats a seed: list each once")
        elif set(confirm) & set(self.seeds):
            problems.append(f"compare.confirm_seeds={list(confirm)} shares {sorted(set(confirm) & set(self.seeds))} "
                            f"with compare.seeds={list(self.seeds)}: the seeds an arm is judged on must be fresh, "
                            "not those its LR was chosen on")
        if self.target_loss is not None and not (positive_number(self.target_loss) or self.target_loss == 0):
            problems.append(f"compare.target_loss={self.target_loss} must be a finite loss >= 0, or null for none")
        if self.parallel < 1:
            problems.append(f"compare.parallel={self.parallel} must be >= 1 (runs at a time), e.g. 2")
        if self.threads_per_run is not None and self.threads_per_run < 1:
            problems.append(f"compare.threads_per_run={self.threads_per_run} must be >= 1, or null for the default")
        self.check_models(problems, model_files)
        problems[:] = list(dict.fromkeys(problems))  # (a shared compare.lrs is checked once per arm)

    def check_models(self, problems: list[str], model_files: tuple) -> None:
        """compare.models: sizes from configs/model/, each once."""
        for model in self.models:
            if model not in model_files:
                near = difflib.get_close_matches(str(model), list(model_files), n=1)
                problems.append(f"compare.models has {model!r}, which is not in configs/model/"
                                f"{f' (did you mean {near[0]!r}?)' if near else ''}: choose from "
                                f"{', '.join(model_files)}")
        if len(set(map(str, self.models))) != len(self.models):
            problems.append(f"compare.models={list(self.models)} repeats a size: list each once")

    def check_grid(self, problems: list[str], arm: str, arm_file: dict) -> None:
        grid, key = self.grid_of(arm, arm_file)
        if grid is None:
            problems.append(f"arm {arm!r} has no LR grid: set lr_grid in configs/arm/{arm}.yaml, or "
                            f"compare.lrs=[...] for every arm, or compare.grids.{arm}=[...]")
        elif not grid or not all(positive_number(x) for x in grid):
            problems.append(f"{key}={grid!r} must be a non-empty list of LRs > 0, e.g. [0.001,0.003,0.01]")
        elif len(set(grid)) != len(grid):
            problems.append(f"{key}={grid!r} repeats an LR: list each once")

    @property
    def judged_seeds(self) -> list:
        """The seeds every verdict and speedup is computed on (and the baseline's budget runs run on)."""
        return list(self.confirm_seeds or self.seeds)

    def grid_of(self, arm: str, arm_file: dict) -> tuple[list | None, str]:
        """An arm's LR grid and the key it came from: compare.grids.ARM, else compare.lrs, else the arm file."""
        if arm in self.grids:
            return _as_list(self.grids[arm]), f"compare.grids.{arm}"
        if self.lrs is not None:
            return list(self.lrs), "compare.lrs"
        return _as_list(arm_file.get("lr_grid")), f"lr_grid in configs/arm/{arm}.yaml"


def check_tune(problems: list[str], arm: str, arm_file: dict) -> None:
    """An arm's `tune`: one config key (not the LR, which has its grid) and a non-empty list of distinct values."""
    from llmstable.config.loader import schema_keys
    from llmstable.config.run import TrainConfig

    tune = arm_file.get("tune")
    if tune is None:
        return
    where = f"tune in configs/arm/{arm}.yaml"
    example = "e.g. tune: {train.max_norm: [0.1, 0.25, 0.5]}"
    if not isinstance(tune, dict) or len(tune) != 1:
        problems.append(f"{where} must map one config key to the values to try, {example}")
        return
    (key, values), = tune.items()
    keys = schema_keys(TrainConfig)
    if key == "optimizer.lr":
        problems.append(f"{where} names optimizer.lr: the LR is always tuned, over lr_grid; tune another key")
    elif key not in keys:
        near = difflib.get_close_matches(str(key), keys, n=1)
        problems.append(f"{where} names {key!r}, which is not a config key"
                        f"{f' (did you mean {near[0]!r}?)' if near else ''}: {example}")
    if not isinstance(values, list) or not values:
        problems.append(f"{where}: {key}={values!r} must be a non-empty list of values, {example}")
    elif not all(isinstance(v, (int, float, str, bool)) for v in values):
        problems.append(f"{where}: {key}={values!r} must list plain values (numbers, strings, booleans): each names "
                        "a run directory")
    elif len(set(map(repr, values))) != len(values):
        problems.append(f"{where}: {key}={values!r} repeats a value: list each once")


def tuned(arm_file: dict) -> tuple[str, list] | None:
    """The arm's tuned key and its values, or None (the arm is tuned over its LR grid only)."""
    tune = arm_file.get("tune")
    return next(iter(tune.items())) if tune else None


def positive_number(x) -> bool:
    """A finite number > 0 (inf passes `> 0`, and nan fails every comparison silently)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def load_sweep(args: list[str], config_dir: Path) -> tuple[SweepConfig, list[str], dict[str, dict]]:
    """Split `compare=NAME`, `compare.KEY=VALUE` and train overrides; merge and check the sweep file. Returns the
    sweep, the train overrides and the arm files (name -> their YAML as a dict)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    name = next((a.split("=", 1)[1] for a in args if a.startswith("compare=")), None)
    options = sorted(p.stem for p in (config_dir / "compare").glob("*.yaml"))
    if name is None or name not in options:
        raise ConfigError([f"compare={name!r} is not a sweep: choose one of {', '.join(options)} "
                           "(files in configs/compare/)"])
    dotlist = [a[len("compare."):] for a in args if a.startswith("compare.")]
    try:
        raw = OmegaConf.merge(OmegaConf.structured(SweepConfig),
                              OmegaConf.load(config_dir / "compare" / f"{name}.yaml"), OmegaConf.from_dotlist(dotlist))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        given = next((a.split("=", 1)[1] for a in dotlist if a.split("=", 1)[0] == key), None)
        valid = ", ".join(f"compare.{f.name}" for f in fields(SweepConfig))
        raise ConfigError([f"compare.{key}{'=' + given if given is not None else ''}: {str(err).splitlines()[0]}. "
                           f"Give a key and a value of the kind configs/compare/*.yaml use (lists in brackets, e.g. "
                           f"compare.seeds=[0,1]); the keys: {valid}"]) from None
    sweep = SweepConfig(**OmegaConf.to_container(raw))
    arm_files = {p.stem: OmegaConf.to_container(OmegaConf.load(p)) or {}
                 for p in sorted((config_dir / "arm").glob("*.yaml"))}
    model_files = tuple(sorted(p.stem for p in (config_dir / "model").glob("*.yaml")))
    problems: list[str] = []
    sweep.validate(problems, arm_files, model_files)
    train_overrides = [a for a in args if not a.startswith("compare")]
    chosen = [str(a) for a in [*sweep.overrides, *train_overrides] if str(a).split("=", 1)[0].lstrip("+") == "model"]
    if sweep.models and chosen:  # (each size's runs choose model=SIZE themselves)
        problems.append(f"{chosen[0]} chooses one model but compare.models={list(sweep.models)} runs the study at each "
                        "of those sizes: drop that override, or choose the sizes with compare.models=[...]")
    if problems:
        raise ConfigError(problems)
    return sweep, train_overrides, arm_files
