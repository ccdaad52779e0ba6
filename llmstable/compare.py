"""`llmstable compare compare=NAME [compare.KEY=VALUE ...] [train overrides ...]`: a fair sweep of arms x LRs x
seeds at a fixed token budget, then the report (llmstable.report).

A sweep file (`configs/compare/NAME.yaml`) names arms from the `arm` group (`configs/arm/*.yaml`: an optimizer
with its hyperparameters, a stabilizer set, a precision), an LR grid, seeds, and the overrides every arm shares.

Fair by construction:
- one initial-weights file per seed, written once into the sweep directory, loaded by every arm
  (`train.init_from`); parameters an arm adds (QK-norm weights) start at their usual init;
- the same data in the same order (the order is a function of the seed), the same budget, schedule and warmup,
  since those come from the shared overrides and no arm file touches them;
- every run records hashes of its initial weights and of its first batch; the report checks them across arms.

The sweep is a real Hydra multirun of `llmstable train` over `arm=...`, `optimizer.lr=...`, `train.seed=...`, so
Hydra's launcher plugins work: `compare.parallel=N` uses the joblib launcher to run N arms at a time. Run
directories are named after the arm, LR and seed, so running the same command again skips finished runs and
resumes unfinished ones exactly (their checkpoints). A diverged arm is a result: it stops at its first
non-finite loss (or its spike guard aborts) and the report shows it as diverged.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from llmstable.config import ConfigError


@dataclass
class SweepConfig:
    """A sweep file's fields (`configs/compare/*.yaml`)."""

    name: str = "sweep"
    arms: list = field(default_factory=list)  # names in configs/arm/
    lrs: list | None = None  # LR grid applied to every arm; null: each arm's own optimizer.lr
    seeds: list = field(default_factory=lambda: [0])
    target_loss: float | None = None  # the report's "tokens to reach" this validation loss
    parallel: int = 1  # arms at a time (the joblib launcher when > 1)
    overrides: list = field(default_factory=list)  # train overrides every arm shares
    sweep_dir: str | None = None  # null: runs/compare/NAME


def load_sweep(args: list[str], config_dir: Path) -> tuple[SweepConfig, list[str]]:
    """Split `compare=NAME`, `compare.KEY=VALUE` and train overrides; load and check the sweep file."""
    name = next((a.split("=", 1)[1] for a in args if a.startswith("compare=")), None)
    options = sorted(p.stem for p in (config_dir / "compare").glob("*.yaml"))
    if name is None or name not in options:
        raise ConfigError([f"compare={name!r} is not a sweep: choose one of {', '.join(options)} "
                           "(files in configs/compare/)"])
    raw = OmegaConf.merge(OmegaConf.structured(SweepConfig),
                          OmegaConf.load(config_dir / "compare" / f"{name}.yaml"),
                          OmegaConf.from_dotlist([a[len("compare."):] for a in args if a.startswith("compare.")]))
    sweep = SweepConfig(**OmegaConf.to_container(raw))
    train_overrides = [a for a in args if not a.startswith("compare")]
    arms = sorted(p.stem for p in (config_dir / "arm").glob("*.yaml"))
    problems = [f"compare.arms has {a!r}, which is not in configs/arm/ ({', '.join(arms)})"
                for a in sweep.arms if a not in arms]
    if not sweep.arms:
        problems.append("compare.arms is empty: list arms from configs/arm/")
    if sweep.parallel < 1:
        problems.append(f"compare.parallel={sweep.parallel} must be >= 1")
    if problems:
        raise ConfigError(problems)
    return sweep, train_overrides


def sweep_dir_of(sweep: SweepConfig) -> Path:
    return Path(sweep.sweep_dir or os.path.join("runs", "compare", sweep.name))


def write_initial_weights(sweep: SweepConfig, train_overrides: list[str], root: Path) -> None:
    """One initial-weights file per seed, written once (atomically) and reused by every arm and every rerun."""
    from safetensors.torch import save_file

    from llmstable.compose import compose_config
    from llmstable.data import build_data
    from llmstable.model import build_model, llama_config

    (root / "init").mkdir(parents=True, exist_ok=True)
    for seed in sweep.seeds:
        path = root / "init" / f"seed{seed}.safetensors"
        if path.exists():
            continue
        cfg = compose_config([*sweep.overrides, *train_overrides, f"train.seed={seed}"], run_dir=root / "init")
        data = build_data(cfg.data, seed, min_train_blocks=cfg.train.global_batch_size)
        import torch

        torch.manual_seed(seed)  # as the trainer seeds its own init
        model = build_model(llama_config(cfg.model, data.vocab_size))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if cfg.model.tie_embeddings:
            state.pop("lm_head.weight")
        tmp = path.with_suffix(".tmp")
        save_file(state, str(tmp))
        os.replace(tmp, path)


def multirun_overrides(sweep: SweepConfig, train_overrides: list[str], root: Path) -> list[str]:
    lr_part = "_lr${optimizer.lr}" if sweep.lrs else ""
    out = [
        "-m",
        f"arm={','.join(sweep.arms)}",
        f"train.seed={','.join(str(s) for s in sweep.seeds)}",
        *sweep.overrides, *train_overrides,
        f"train.init_from={root.resolve()}/init/seed${{train.seed}}.safetensors",
        f"hydra.sweep.dir={root}",
        f"hydra.sweep.subdir=${{name}}{lr_part}_seed${{train.seed}}",
        "train.progress=false",
        "train.sample_tokens=0",
    ]
    if sweep.lrs:
        out.append(f"optimizer.lr={','.join(str(lr) for lr in sweep.lrs)}")
    if sweep.parallel > 1:
        out += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={sweep.parallel}"]
    return out


def compare_command(args: list[str]) -> int:
    from llmstable.compose import CONFIG_DIR
    from llmstable.train import train_command
    from llmstable.report import write_report

    try:
        sweep, train_overrides = load_sweep(args, CONFIG_DIR)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    root = sweep_dir_of(sweep)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(sweep)))
    write_initial_weights(sweep, train_overrides, root)
    code = train_command(multirun_overrides(sweep, train_overrides, root))
    if code:
        return code
    report = write_report(root, target_loss=sweep.target_loss)
    print(f"report: {report}")
    return 0
