"""`llmstable compare compare=NAME [compare.KEY=VALUE ...] [train overrides ...]`: a study of arms, each at its
own tuned LR, over paired seeds, at a fixed token budget, then the report (llmstable.report).

A sweep file (`configs/compare/NAME.yaml`, schema `llmstable.config.sweep`) names arms from the `arm` group
(`configs/arm/*.yaml`: an optimizer with its hyperparameters, a stabilizer set, and its default `lr_grid`), the
seeds, the baseline and its budget fractions, and the overrides every arm shares. The study runs in four steps,
each a Hydra multirun of `llmstable train` that skips what is already finished:

1. every arm over its own LR grid and every seed of `compare.seeds` (an arm with `tune` in its file, e.g. AdamW's
   clipping threshold, over its LR grid times the values of that one key: the report keeps the value with the best
   loss); the LRs are chosen on these runs;
2. with `compare.extend_grid=true`, one more LR past the edge of each grid whose best LR sits on it;
3. with `compare.confirm_seeds`, every arm again at its chosen LR (and value) on those fresh seeds: the verdicts
   and speedups are computed on these runs alone, so the choice and the judgement share none;
4. the baseline at its chosen LR at each fraction of the budget (`compare.budget_fractions`, the 1.0 run is the
   grid's or the confirmation's), on the judged seeds, for the curve L(D) the speedups are read from. These are
   the same run, shorter: a warm-up given in steps becomes the same share of each run (schedule.warmup_fraction),
   the decay ends at each run's own last step, and Stable-SPAM's total_T=auto follows the run; an optimizer's own
   step counts (SPAM's DeltaT, ...) stay as set, and the report lists them.

Fair by construction:
- one initial-weights file per seed, written once into the sweep directory, loaded by every arm
  (`train.init_from`); parameters an arm adds (QK-norm weights) start at their usual init;
- the same data in the same order (the order is a function of the seed), the same budget, schedule and warmup,
  since those come from the shared overrides and no arm file touches them;
- every run records hashes of its initial weights and of its first batch; the report checks them across arms.

Hydra's launcher plugins work: `compare.parallel=N` uses the joblib launcher to run N runs at a time, each with
one torch thread (`compare.threads_per_run`), which on a small model is faster than N threads for one run. Run
directories are named after the arm, LR and seed (and budget, or tuned value), so running the same command again
skips finished runs and resumes unfinished ones exactly (their checkpoints). A diverged arm is a result: it stops
at its first non-finite loss (or its spike guard aborts) and the report shows it as diverged.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from llmstable.config import ConfigError
from llmstable.config.sweep import SweepConfig, load_sweep, tuned
from llmstable.report.runs import BUDGET_TAG


def sweep_dir_of(sweep: SweepConfig) -> Path:
    return Path(sweep.sweep_dir or os.path.join("runs", "compare", sweep.name))


def write_initial_weights(sweep: SweepConfig, train_overrides: list[str], root: Path) -> None:
    """One initial-weights file per seed, written once (atomically) and reused by every arm and every rerun."""
    from safetensors.torch import save_file

    from llmstable.compose import compose_config
    from llmstable.data import build_data
    from llmstable.model import build_model, llama_config

    (root / "init").mkdir(parents=True, exist_ok=True)
    for seed in [*sweep.seeds, *sweep.confirm_seeds]:
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


def unfinished(root: Path, arms: list[str], lrs: list[float], seeds: list[int], tags: list[str]) -> list[tuple]:
    """(lr, seed, run directory) of every run that has no summary.json yet (finished and diverged runs have one),
    as Hydra names the directories (${name}_lr${optimizer.lr}_seed${train.seed} plus the tag)."""
    runs = [(lr, seed, root / f"{arm}_lr{float(lr)}_seed{seed}{tag}")
            for arm in arms for lr in lrs for seed in seeds for tag in tags]
    return [run for run in runs if not (run[2] / "summary.json").exists()]


def pending(root: Path, arms: list[str], lrs: list[float], seeds: list[int], tags: list[str]) -> tuple[list, list]:
    """The LRs and seeds with a run still to do (see `unfinished`)."""
    missing = unfinished(root, arms, lrs, seeds, tags)
    return sorted({lr for lr, _, _ in missing}), sorted({seed for _, seed, _ in missing})


def launch(sweep: SweepConfig, train_overrides: list[str], root: Path, arms: list[str], lrs: list[float],
           extra: tuple[str, ...] = (), tag: str = "", tags: tuple[str, ...] = ("",), seeds=None) -> int:
    """One Hydra multirun of `llmstable train` over arms x lrs x seeds (the sweep's, or `seeds`) (x the values in
    `extra`) for the LRs and seeds with a run still to do; run directories are NAME_lrLR_seedSEED plus `tag`
    (`tags`: its values), so a rerun finds, skips or resumes its runs. Nothing is launched when every run has its
    summary: a diverged run would otherwise resume from its last checkpoint and diverge again."""
    from llmstable.progress import Progress
    from llmstable.cli.train import train_command

    seeds = list(sweep.seeds if seeds is None else seeds)
    todo = [run for _, _, run in unfinished(root, arms, lrs, seeds, list(tags))]
    lrs, seeds = pending(root, arms, lrs, seeds, list(tags))
    if not lrs:
        return 0
    overrides = [
        "-m",
        f"arm={','.join(arms)}",
        f"optimizer.lr={','.join(str(lr) for lr in lrs)}",
        f"train.seed={','.join(str(s) for s in seeds)}",
        *sweep.overrides, *train_overrides, *extra,
        f"train.init_from={root.resolve()}/init/seed${{train.seed}}.safetensors",
        f"hydra.sweep.dir={root}",
        f"hydra.sweep.subdir=${{name}}_lr${{optimizer.lr}}_seed${{train.seed}}{tag}",
        "train.progress=false",
        "train.sample_tokens=0",
    ]
    if sweep.parallel > 1:
        overrides += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={sweep.parallel}"]
    # The runs' own bars are off (they may run in parallel): the sweep's progress is its finished runs, counted on
    # disk, since under the joblib launcher they run in other processes.
    with Progress(f"compare: {','.join(arms)}", total=len(todo), unit="run",
                  poll=lambda: sum((run / "summary.json").exists() for run in todo)):
        return train_command(overrides)


def grids(sweep: SweepConfig, arm_files: dict[str, dict]) -> dict[str, list[float]]:
    return {arm: [float(lr) for lr in sweep.grid_of(arm, arm_files[arm])[0]] for arm in sweep.arms}


def tune_launch(arm: str, rendered: dict[str, tuple[str, list[str]]], only=None) -> dict:
    """launch()'s `extra`, `tag` and `tags` for an arm tuned over one key (`rendered`: arm -> the key and its
    values as the run's config holds them, which is how Hydra names the directory): every value, or `only`; {} for
    an arm without `tune`."""
    if arm not in rendered:
        return {}
    key, values = rendered[arm]
    values = values if only is None else [str(only)]
    short = key.rsplit(".", 1)[-1]
    return {"extra": (f"{key}={','.join(values)}",), "tag": f"_{short}${{{key}}}",
            "tags": tuple(f"_{short}{v}" for v in values)}


def render_tuned(sweep: SweepConfig, train_overrides: list[str], root: Path,
                 arm_files: dict[str, dict]) -> dict[str, tuple[str, list[str]]]:
    """Compose each tuned arm with each of its values, so that a bad value is a named error now rather than a failed
    run later; returns arm -> (key, the values as the run's config holds them: `1` for a float key is `1.0`)."""
    from llmstable.compose import compose_config
    from llmstable.config import to_dict
    from llmstable.config import flatten

    out = {}
    for arm in sweep.arms:
        if (tune := tuned(arm_files[arm])) is None:
            continue
        key, values = tune
        out[arm] = (key, [str(flatten(to_dict(compose_config(
            [*sweep.overrides, *train_overrides, f"arm={arm}", f"{key}={value}"], run_dir=root / "init")))[key])
            for value in values])
    return out


def current_study(root: Path, sweep: SweepConfig) -> dict:
    """The study of the runs finished so far: each arm's chosen LR comes from the selection seeds' runs alone."""
    from llmstable.report.runs import readable_runs
    from llmstable.report.study import analyse

    return analyse(readable_runs(root)[1], sweep.baseline, sweep.confirm_seeds)


def budget_overrides(sweep: SweepConfig, train_overrides: list[str], root: Path) -> tuple[str, list[str], tuple]:
    """The key that sets the budget, its values at each fraction other than 1 (the full-budget runs are the 1),
    and the overrides that keep the schedule's shape: a warm-up given in steps becomes that share of every run."""
    from llmstable.compose import compose_config

    cfg = compose_config([*sweep.overrides, *train_overrides, f"arm={sweep.baseline}"], run_dir=root / "init")
    key = "train.budget_tokens" if cfg.train.budget_tokens is not None else "train.max_steps"
    full = cfg.train.budget_tokens if cfg.train.budget_tokens is not None else cfg.train.max_steps
    values = sorted({max(1, round(f * full)) for f in sweep.budget_fractions if f != 1.0} - {full})
    shape: tuple = ()
    if values and cfg.schedule.warmup_fraction is None and cfg.schedule.warmup_steps > 0:
        share = cfg.schedule.warmup_steps / cfg.total_steps  # (times the full run's steps: exactly its warm-up)
        shape = (f"schedule.warmup_fraction={share!r}",)
        print(f"compare: the budget runs warm up for the same share of their steps as the full runs: "
              f"schedule.warmup_fraction={share:.4g} ({cfg.schedule.warmup_steps} of {cfg.total_steps} steps)",
              file=sys.stderr)
    return key, [str(v) for v in values], shape


def launch_confirmations(sweep: SweepConfig, train_overrides: list[str], root: Path,
                         rendered: dict[str, tuple[str, list[str]]]) -> int:
    """Every arm at its chosen LR (and tuned value) on the fresh seeds of compare.confirm_seeds; untuned arms that
    chose the same LR share one multirun."""
    groups: dict[tuple, list[str]] = {}
    for arm in current_study(root, sweep)["arms"]:
        if arm["best_lr"] is not None and arm["arm"] in sweep.arms:  # (None: every LR diverged; the report says)
            value = (arm["tuned"] or {}).get("value")
            groups.setdefault((arm["best_lr"], arm["arm"] if arm["tuned"] else None, value), []).append(arm["arm"])
    for (lr, _, value), arms in groups.items():
        if code := launch(sweep, train_overrides, root, arms, [lr], **tune_launch(arms[0], rendered, value),
                          seeds=sweep.confirm_seeds):
            return code
    return 0


# glibc hands every block above its mmap threshold (and the heap's top above its trim threshold) back to the kernel
# when it is freed, so each step of a small CPU model page-faults its largest activations afresh: 40 steps of
# compare=quick_cpu's tiny_1m spent 6.4 of 39.6 s in the kernel, and 1.2 of 33.9 s with these two settings. A sweep's
# runs keep those pages instead (up to 512 MiB each). Set through the environment for run processes (glibc reads
# it at start; a user's own setting wins) and through mallopt for runs in this process.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": (-3, 256 << 20), "MALLOC_TRIM_THRESHOLD_": (-1, 512 << 20)}  # (mallopt param)


def set_run_environment(sweep: SweepConfig) -> None:
    """One torch thread per run when runs go in parallel (read by each worker's torch at import); the parent's own
    torch too, for what it runs in process. Also the allocator settings above, for every sweep."""
    for var, (param, value) in MALLOC.items():
        if var not in os.environ:
            os.environ[var] = str(value)
            try:
                import ctypes

                ctypes.CDLL("libc.so.6").mallopt(param, value)
            except (OSError, AttributeError):  # not glibc: nothing to set
                pass
    threads = sweep.threads_per_run or (1 if sweep.parallel > 1 else None)
    if threads is None:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def compare_command(args: list[str]) -> int:
    from llmstable.compose import CONFIG_DIR

    try:
        sweep, train_overrides, arm_files = load_sweep(args, CONFIG_DIR)
        root = sweep_dir_of(sweep)
        root.mkdir(parents=True, exist_ok=True)
        (root / "sweep.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(sweep)))
        set_run_environment(sweep)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not sweep.models:
        return run_study(sweep, train_overrides, root, arm_files)
    for model in sweep.models:  # the whole study at each size, in its own directory
        if code := run_study(sweep, [*train_overrides, f"model={model}"], root / model, arm_files):
            return code
    from llmstable.report.proxy_page import write_proxy_report

    print(f"report: {write_proxy_report(root, list(sweep.models))}")
    return 0


def run_study(sweep: SweepConfig, train_overrides: list[str], root: Path, arm_files: dict[str, dict]) -> int:
    """The three steps of the study (see the module's docstring) in `root`, then its report."""
    from llmstable.report import write_report

    try:
        root.mkdir(parents=True, exist_ok=True)
        rendered = render_tuned(sweep, train_overrides, root, arm_files)
        write_initial_weights(sweep, train_overrides, root)
        key, budgets, shape = budget_overrides(sweep, train_overrides, root)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    by_grid: dict[tuple, list[str]] = {}
    for arm, grid in grids(sweep, arm_files).items():  # arms that share a grid share one multirun (untuned ones)
        by_grid.setdefault((tuple(grid), arm if tuned(arm_files[arm]) else None), []).append(arm)
    for (grid, _), arms in by_grid.items():
        if code := launch(sweep, train_overrides, root, arms, list(grid), **tune_launch(arms[0], rendered)):
            return code
    if sweep.extend_grid:
        for arm in current_study(root, sweep)["arms"]:
            if arm["extend_with"] and arm["arm"] in sweep.arms:
                print(f"compare: {arm['arm']}'s best LR {arm['best_lr']:g} is on the {arm['grid_edge']} edge of "
                      f"its grid; adding {', '.join(f'{x:g}' for x in arm['extend_with'])}", file=sys.stderr)
                if code := launch(sweep, train_overrides, root, [arm["arm"]], arm["extend_with"],
                                  **tune_launch(arm["arm"], rendered, (arm["tuned"] or {}).get("value"))):
                    return code
    if sweep.confirm_seeds and (code := launch_confirmations(sweep, train_overrides, root, rendered)):
        return code
    base = next((a for a in current_study(root, sweep)["arms"] if a["arm"] == sweep.baseline), None)
    if budgets and base is not None and base["best_lr"] is not None:  # (None: every LR diverged; the report says)
        fixed = tune_launch(base["arm"], rendered, (base["tuned"] or {}).get("value"))
        if code := launch(sweep, train_overrides, root, [sweep.baseline], [base["best_lr"]],
                          (*fixed.get("extra", ()), *shape, f"{key}={','.join(budgets)}"),
                          fixed.get("tag", "") + f"{BUDGET_TAG}${{{key}}}",
                          tuple(t + f"{BUDGET_TAG}{v}" for t in fixed.get("tags", ("",)) for v in budgets),
                          seeds=sweep.judged_seeds):
            return code
    report = write_report(root, target_loss=sweep.target_loss, baseline=sweep.baseline,
                          confirm_seeds=sweep.confirm_seeds)
    print(f"report: {report}")
    return 0
